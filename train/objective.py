"""Objectives: what the train step differentiates, by name (``config.train.objective``).

An objective declares the batch it reads (``batch_keys``: int32 [batch, seq] arrays, the LM's five
or the paired ``chosen_*``/``rejected_*``, and for the preference objectives of ``train.orpo`` float32
per-pair features such as the reference log-probs), what it logs, and computes, from the parameters and
one (micro)batch, a ``Loss``:

    total    summed loss to differentiate: the task loss plus weight x sum(aux["losses"])
    weight   what the losses are summed over (tokens, pairs); the step divides sums by it
    sums     {name: sum over the batch} for each name of ``logs``, logged as sum / weight ("loss":
             the task loss alone)
    means    {name: scalar}: the model's aux["losses"] and aux["metrics"] (e.g. "moe/loss",
             "moe/dropped_fraction/layer1"), logged as they are, averaged over microbatches

so a step with gradient accumulation sums ``total``, ``weight`` and ``sums`` over microbatches,
and the train step, the eval step and ``train.evaluate`` treat every objective alike. Nothing
model-specific is named here: auxiliary losses reach the loss only through ``aux["losses"]``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from train.data import BATCH_KEYS as LM_KEYS
from train.data import PAIR_KEYS


class Loss(NamedTuple):
    total: jax.Array           # float32 scalar: differentiated
    weight: jax.Array          # float32 scalar
    sums: dict                 # name -> float32 scalar, summed like ``total``
    means: dict                # name -> float32 scalar, averaged over microbatches


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective: its name, the batch keys it reads, the sums it logs, what its weight counts, and
    its loss: loss(model, mcfg, params, batch, *, train, rng) -> Loss; ``train``/``rng`` go to the
    model's ``blocks`` (train mode: e.g. dropout, MoE capacity). The train step logs each of ``logs``
    (sum / weight), the weight as ``weight_name``, grad_norm and the model's ``Loss.means``.
    """
    name: str
    batch_keys: tuple[str, ...]
    logs: tuple[str, ...]      # the keys of Loss.sums ("loss" among them)
    weight_name: str           # e.g. "tokens", "pairs"
    loss: Callable[..., Loss]


# ----------------------------------------------------------------------------- shared pieces

def token_nll(model, mcfg, params, x: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int = 0, *,
              per_row: bool = False) -> jax.Array:
    """Sum over tokens of mask * -log softmax(head(x))[target], in float32: a scalar, or [batch] per row.

    x [batch, seq, d] final hidden states. With ``chunk`` (dividing seq) the head and softmax run
    on [batch, chunk] slices in a rematerialised scan, so float32 logits for the whole batch are
    never held at once (forward or backward); 0 computes them in one piece.
    """
    b, s, _ = x.shape
    reduce = (lambda a: jnp.sum(a, axis=-1)) if per_row else jnp.sum  # noqa: E731

    def nll(xc, tc, mc):
        logits = model.head(params, xc, mcfg)
        target_logit = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return reduce((jax.nn.logsumexp(logits, axis=-1) - target_logit) * mc)

    if not chunk or chunk >= s:
        return nll(x, targets, mask)
    split = lambda a: a.reshape(b, s // chunk, chunk, *a.shape[2:]).swapaxes(0, 1)  # noqa: E731
    body = jax.checkpoint(lambda total, xs: (total + nll(*xs), None))
    zero = jnp.zeros((b,) if per_row else (), jnp.float32)
    total, _ = jax.lax.scan(body, zero, (split(x), split(targets), split(mask)))
    return total


def forward(model, mcfg, params, batch: dict, prefix: str = "", *, train: bool = False, rng=None):
    """(final hidden states [batch, seq, d], aux) of the rows ``batch[prefix + 'inputs']`` (with their
    positions and segment ids; without positions, each row counts from 0)."""
    tokens = batch[prefix + "inputs"]
    positions = batch.get(prefix + "positions")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    x = model.embed(params, tokens, mcfg)
    x, _, aux = model.blocks(params["layers"], x, mcfg, positions=positions,
                             segment_ids=batch.get(prefix + "segment_ids"), train=train, rng=rng)
    return x, aux


def aux_parts(aux: dict) -> tuple[jax.Array, dict]:
    """(sum of aux["losses"] (0 if none), {name: scalar} of aux["losses"] and aux["metrics"])."""
    losses, metrics = dict(aux.get("losses") or {}), dict(aux.get("metrics") or {})
    extra = sum(losses.values(), jnp.zeros((), jnp.float32))
    return extra, {**losses, **metrics}


# ----------------------------------------------------------------------------- the LM objective

def lm_objective(train_cfg=None, loss_chunk: int | None = None) -> Objective:
    """Next-token cross-entropy summed over ``loss_mask`` tokens (weight: their count), plus the
    model's auxiliary losses per token. ``loss_chunk``: see ``token_nll`` (default ``train.loss_chunk``)."""
    chunk = loss_chunk if loss_chunk is not None else (train_cfg.loss_chunk if train_cfg is not None else 0)

    def loss(model, mcfg, params, batch, *, train=False, rng=None) -> Loss:
        x, aux = forward(model, mcfg, params, batch, train=train, rng=rng)
        mask = batch["loss_mask"].astype(jnp.float32)
        nll = token_nll(model, mcfg, params, x, batch["targets"], mask, chunk)
        tokens = jnp.sum(mask)
        extra, means = aux_parts(aux)
        return Loss(nll + tokens * extra, tokens, {"loss": nll}, means)

    return Objective("lm", LM_KEYS, ("loss",), "tokens", loss)


# ----------------------------------------------------------------------------- a paired objective

def pair_margin_objective(train_cfg=None, *, beta: float | None = None, nll_weight: float | None = None,
                          loss_chunk: int | None = None) -> Objective:
    """A margin between two rows' log-probabilities, per pair (weight: the number of pairs):

        loss = -log sigmoid(beta * (log p(chosen) - log p(rejected)))  +  nll_weight * NLL(chosen) / |chosen|

    log p(row) = sum of log p(target) over the row's ``loss_mask`` tokens (the response; prompt
    tokens are masked out), NLL(chosen) = -log p(chosen) and |chosen| its token count. Chosen and
    rejected rows go through the model as one [2 x batch, seq] batch. ``beta``, ``nll_weight``:
    default ``train.pair_beta``, ``train.pair_nll_weight``. Logs loss, accuracy (share of pairs
    with log p(chosen) > log p(rejected)), margin (mean log p(chosen) - log p(rejected)) and
    chosen_nll (per token, averaged over pairs).
    """
    beta = beta if beta is not None else train_cfg.pair_beta
    nll_weight = nll_weight if nll_weight is not None else train_cfg.pair_nll_weight
    chunk = loss_chunk if loss_chunk is not None else (train_cfg.loss_chunk if train_cfg is not None else 0)

    def loss(model, mcfg, params, batch, *, train=False, rng=None) -> Loss:
        both = {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]]) for k in LM_KEYS}
        x, aux = forward(model, mcfg, params, both, train=train, rng=rng)
        mask = both["loss_mask"].astype(jnp.float32)
        row_nll = token_nll(model, mcfg, params, x, both["targets"], mask, chunk, per_row=True)
        n = batch["chosen_inputs"].shape[0]
        chosen_nll, rejected_nll = row_nll[:n], row_nll[n:]
        chosen_tokens = jnp.maximum(jnp.sum(mask[:n], axis=-1), 1.0)
        margin = rejected_nll - chosen_nll  # log p(chosen) - log p(rejected)
        per_pair = -jax.nn.log_sigmoid(beta * margin) + nll_weight * chosen_nll / chosen_tokens
        pair_loss = jnp.sum(per_pair)
        pairs = jnp.asarray(n, jnp.float32)
        extra, means = aux_parts(aux)
        sums = {"loss": pair_loss, "accuracy": jnp.sum((margin > 0).astype(jnp.float32)),
                "margin": jnp.sum(margin), "chosen_nll": jnp.sum(chosen_nll / chosen_tokens)}
        return Loss(pair_loss + pairs * extra, pairs, sums, means)  # the aux losses once per unit of weight

    return Objective("pair_margin", PAIR_KEYS, ("loss", "accuracy", "margin", "chosen_nll"), "pairs", loss)


OBJECTIVES: dict[str, Callable[..., Objective]] = {"lm": lm_objective, "pair_margin": pair_margin_objective}


def _preference(factory: str) -> Callable[..., Objective]:
    """An objective of ``train.orpo`` (imported when asked for: it builds on this module)."""
    def make(train_cfg=None, **kwargs) -> Objective:
        from train import orpo
        return getattr(orpo, factory)(train_cfg, **kwargs)
    return make


OBJECTIVES.update(orpo=_preference("orpo_objective"), dpo=_preference("dpo_objective"),
                  preference_model=_preference("preference_model_objective"))


def get(train_cfg) -> Objective:
    """The objective ``train_cfg.objective`` names, configured from ``train_cfg``."""
    return OBJECTIVES[train_cfg.objective](train_cfg)
