"""Pure training pieces: optimizer, LM loss, train state, train and eval steps.

The step functions are sharding-agnostic; the trainer jits them with the shardings that
``parallel.sharding`` derives from the config's rules.
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


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW on ``make_schedule`` with global-norm clipping; weight decay on matrices only."""
    schedule = make_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                             weight_decay=optim_cfg.weight_decay,
                             mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
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


def lm_loss(model, mcfg, params, batch: dict, *, loss_chunk: int = 0) -> tuple[jax.Array, dict]:
    """Summed next-token cross-entropy (float32) over ``loss_mask`` and the token count.

    batch: inputs, targets, loss_mask and optionally segment_ids, positions, each [batch, seq]
    (without segment_ids every row is one causal sequence). Returns
    (sum of -log p(target), {'tokens': count}).
    """
    tokens = batch["inputs"]
    positions = batch.get("positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = model.embed(params, tokens, mcfg)
    x, _, _ = model.blocks(params["layers"], x, mcfg, positions=positions, segment_ids=batch.get("segment_ids"))
    mask = batch["loss_mask"].astype(jnp.float32)
    return token_nll(model, mcfg, params, x, batch["targets"], mask, loss_chunk), {"tokens": jnp.sum(mask)}


LOSSES: dict[str, Callable] = {"lm": lm_loss}


def make_train_step(model, mcfg, tx, *, objective: str = "lm", accum_steps: int = 1, loss_chunk: int = 0):
    """train_step(state, batch) -> (state, metrics); gradients summed over ``accum_steps`` microbatches.

    The loss is the mean over every loss-masked token of the whole batch, so a step with
    accumulation equals the same step on the full batch.
    """
    loss_fn = functools.partial(LOSSES[objective], loss_chunk=loss_chunk)

    def grads_of(params, micro):
        (nll, metrics), grads = jax.value_and_grad(
            lambda p: loss_fn(model, mcfg, p, micro), has_aux=True)(params)
        return nll, metrics["tokens"], grads

    def train_step(state: TrainState, batch: dict):
        if accum_steps == 1:
            nll, tokens, grads = grads_of(state.params, batch)
        else:
            # Microbatch i takes rows i, i + accum, ...: each device keeps its own rows.
            micro = jax.tree.map(lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1), batch)

            def body(carry, mb):
                nll, tokens, grads = grads_of(state.params, mb)
                acc = jax.tree.map(jnp.add, carry, (nll, tokens, grads))
                return acc, None

            zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
            (nll, tokens, grads), _ = jax.lax.scan(body, zeros, micro)
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        # The state keeps its dtypes (bf16 parameters keep bf16 moments even where optax promotes).
        opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), opt_state, state.opt_state)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": nll / denom, "grad_norm": optax.tree.norm(grads), "tokens": tokens}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model, mcfg, *, objective: str = "lm"):
    """eval_step(params, batch) -> {'nll': summed loss, 'tokens': count}."""
    loss_fn = LOSSES[objective]

    def eval_step(params, batch):
        nll, metrics = loss_fn(model, mcfg, params, batch)
        return {"nll": nll, "tokens": metrics["tokens"]}

    return eval_step
