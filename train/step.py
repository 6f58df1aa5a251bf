"""Pure training pieces: optimizer, LM loss, train state, train and eval steps.

The step functions are sharding-agnostic; the trainer jits them with the shardings that
``parallel.sharding`` derives from the config's rules.

Auxiliary losses: a family's ``blocks`` returns ``aux['losses']`` (weighted per-token scalars,
e.g. "moe/loss") and ``aux['metrics']`` (scalars, e.g. "moe/dropped_fraction/layer3"). The train
step adds tokens x the sum of the losses to the objective and logs the metrics; "loss" stays
the cross-entropy alone, comparable with a dense model and with the eval loss. Families
whose ``blocks`` take ``train`` and ``rng`` keywords get train mode in the train step (with
a PRNG key from the config seed and the step, for expert dropout) and eval mode elsewhere;
others are called without them, and an empty aux adds nothing.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine decay to ``end_lr_ratio * lr`` at ``total_steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=optim_cfg.warmup_steps,
        decay_steps=max(total_steps, optim_cfg.warmup_steps + 1), end_value=optim_cfg.lr * optim_cfg.end_lr_ratio)


def decay_mask(param_axes) -> Any:
    """True for the parameters AdamW decays: matrices (two or more logical axes besides ``layers``),
    except the state matrix A_log (axis ``state``), which Gu & Dao exclude along with D. Norm
    scales, biases, D and dt_bias, stacked over layers or not, are not decayed."""
    def decays(axes):
        own = [a for a in axes if a != "layers"]
        return len(own) >= 2 and "state" not in own
    return jax.tree.map(decays, param_axes, is_leaf=lambda a: isinstance(a, tuple))


def make_optimizer(optim_cfg, total_steps: int, param_axes) -> optax.GradientTransformation:
    """AdamW on ``make_schedule`` with global-norm clipping; weight decay where ``decay_mask(param_axes)``."""
    schedule = make_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask(param_axes)))
    return optax.chain(*parts)


def init_state(model, mcfg, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    params = model.init(mcfg, rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def token_nll(model, mcfg, params, x: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int = 0) -> jax.Array:
    """Sum over tokens of mask * -log softmax(head(x))[target], in float32.

    x [batch, seq, d] final hidden states. With ``chunk`` (dividing seq) the head and softmax run
    on [batch, chunk] slices in a rematerialised scan, so float32 logits for the whole batch are
    never held at once (forward or backward); 0 computes them in one piece.
    """
    b, s, _ = x.shape

    def nll(xc, tc, mc):
        logits = model.head(params, xc, mcfg)
        target_logit = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * mc)

    if not chunk or chunk >= s:
        return nll(x, targets, mask)
    split = lambda a: a.reshape(b, s // chunk, chunk, *a.shape[2:]).swapaxes(0, 1)  # noqa: E731
    body = jax.checkpoint(lambda total, xs: (total + nll(*xs), None))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(x), split(targets), split(mask)))
    return total


def aux_loss(aux: dict) -> jax.Array:
    """The auxiliary objective in a ``blocks`` aux: the sum of ``aux['losses']`` (0 if none)."""
    return sum(aux.get("losses", {}).values(), jnp.zeros((), jnp.float32))


def lm_loss(model, mcfg, params, batch: dict, *, loss_chunk: int = 0, train: bool = False,
            rng=None) -> tuple[jax.Array, dict]:
    """Summed next-token cross-entropy (float32) over ``loss_mask``, the token count and the blocks' aux.

    batch: inputs, targets, loss_mask and optionally segment_ids, positions, each [batch, seq]
    (without segment_ids every row is one causal sequence). ``train``/``rng`` go to ``blocks``
    (train or eval mode, e.g. MoE capacity and dropout). Returns (sum of -log p(target),
    {'tokens': count, 'aux': the blocks' aux, e.g. per-layer MoE losses and metrics}).
    """
    tokens = batch["inputs"]
    positions = batch.get("positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = model.embed(params, tokens, mcfg)
    x, _, aux = model.blocks(params["layers"], x, mcfg, positions=positions, segment_ids=batch.get("segment_ids"),
                             train=train, rng=rng)
    mask = batch["loss_mask"].astype(jnp.float32)
    nll = token_nll(model, mcfg, params, x, batch["targets"], mask, loss_chunk)
    return nll, {"tokens": jnp.sum(mask), "aux": aux}


LOSSES: dict[str, Callable] = {"lm": lm_loss}


def make_objective(model, mcfg, *, objective: str = "lm", loss_chunk: int = 0):
    """objective(params, batch, rng) -> (value to differentiate, (nll, tokens, aux_loss, per-layer aux)).

    value = summed task loss + tokens x ``aux_loss(aux)``: divided by the batch's token count
    it is the mean loss per token plus the auxiliary losses, as the train step takes it. Runs
    the model in train mode with ``rng``.
    """
    loss_fn = functools.partial(LOSSES[objective], loss_chunk=loss_chunk, train=True)

    def objective_fn(params, batch, rng):
        nll, metrics = loss_fn(model, mcfg, params, batch, rng=rng)
        extra = aux_loss(metrics["aux"])
        per_layer = dict(metrics["aux"].get("metrics") or {})
        return nll + metrics["tokens"] * extra, (nll, metrics["tokens"], extra, per_layer)

    return objective_fn


def step_rng(seed: int, step, microbatch=0) -> jax.Array:
    """The train-mode key of a step's microbatch: ``fold_in(fold_in(PRNGKey(seed), step), microbatch)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), step), microbatch)


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads) -> TrainState:
    """One optimizer update of ``state`` (step + 1). The state keeps its dtypes: bf16 parameters keep
    bf16 moments even where optax promotes them."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state.opt_state)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)


def make_train_step(model, mcfg, tx, *, objective: str = "lm", accum_steps: int = 1, loss_chunk: int = 0,
                    seed: int = 0):
    """train_step(state, batch) -> (state, metrics); gradients summed over ``accum_steps`` microbatches.

    The loss is the mean over every loss-masked token of the whole batch, so a step with
    accumulation equals the same step on the full batch (with MoE, up to routing: groups and
    capacity are per microbatch). Auxiliary (MoE) losses are added to it, each microbatch's
    weighted by its token count. The model runs in train mode with the key ``step_rng(seed, step,
    microbatch)``. Metrics: loss (the task
    loss alone), grad_norm, tokens, and with auxiliary losses ``moe/loss`` (their sum, added) and
    every metric of ``aux['metrics']`` (averaged over microbatches).
    """
    objective_fn = make_objective(model, mcfg, objective=objective, loss_chunk=loss_chunk)

    def grads_of(params, micro, rng):
        (_, (nll, tokens, extra, per_layer)), grads = jax.value_and_grad(
            objective_fn, has_aux=True)(params, micro, rng)
        return (nll, tokens, grads), (extra, per_layer)

    def train_step(state: TrainState, batch: dict):
        if accum_steps == 1:
            (nll, tokens, grads), (extra, per_layer) = grads_of(state.params, batch, step_rng(seed, state.step))
        else:
            # Microbatch i takes rows i, i + accum, ...: each device keeps its own rows.
            micro = jax.tree.map(lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, xs):
                mb, i = xs
                sums, logged = grads_of(state.params, mb, step_rng(seed, state.step, i))
                return jax.tree.map(jnp.add, carry, sums), logged

            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (nll, tokens, grads), logged = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
            extra, per_layer = jax.tree.map(lambda a: jnp.mean(a, axis=0), logged)
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        metrics = {"loss": nll / denom, "grad_norm": optax.tree.norm(grads), "tokens": tokens}
        if per_layer:
            metrics["moe/loss"] = extra
            metrics.update(per_layer)
        return apply_gradients(tx, state, grads), metrics

    return train_step


def make_eval_step(model, mcfg, *, objective: str = "lm"):
    """eval_step(params, batch) -> {'nll': summed loss, 'tokens': count}, and every metric of the
    eval-mode forward's ``aux['metrics']`` (MoE: capacity factor ``moe_capacity_factor_eval``) as
    ``eval_`` + its name."""
    loss_fn = LOSSES[objective]

    def eval_step(params, batch):
        nll, metrics = loss_fn(model, mcfg, params, batch)
        per_layer = metrics["aux"].get("metrics") or {}
        return {"nll": nll, "tokens": metrics["tokens"], **{f"eval_{k}": v for k, v in per_layer.items()}}

    return eval_step
