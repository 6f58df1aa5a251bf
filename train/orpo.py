"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"), with DPO
(Rafailov et al. 2023) as the baseline it compares against, and the soft-label Bradley-Terry loss of a
preference model (Bai et al. 2022), all as objectives of the one trainer (``train.objective``).

For a pair (x, y_w, y_l) of a paired batch (PAIR_KEYS; one pair is segment s of row r on both sides):

ORPO (sec. 4, eqs. 4-7):   L = L_SFT + lambda * L_OR,   L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)),
    log odds(y) = l - log(1 - e^l),  l = (1/|y|) sum_t log p(y_t | x, y_<t)   (mean per-token log-prob)
    L_SFT = -(1/|y_w|) sum_t log p(y_w,t | ...): the chosen response's mean NLL (with
    ``train.orpo_nll_on_prompt``, over the prompt's tokens too).
  log(1 - e^l) is computed stably in float32: l clamped to <= -1e-6, log(-expm1(l)) above -ln 2 and
  log1p(-exp(l)) below, each branch fed a safe input (the double-``where`` pattern), so values and
  gradients stay finite as l -> 0.

DPO (eq. 7):      L = -log sigmoid(beta * ((log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)))),
  log pi(y) summed over the response, beta = ``train.dpo_beta`` (0.1). The reference model is frozen,
  so its log-probs are a property of the data: ``reference_logps`` computes them once with the reference
  parameters and ``add_reference_logps`` writes them into the pairs' JSONL (``ref_chosen_logp``,
  ``ref_rejected_logp``); the 'preference' source with ``data.reference_logps=True`` carries them into
  the batch. The train state then holds only the policy, and a DPO run is an ordinary run of the trainer.

Bradley-Terry preference model (Bai et al. 2022, sec. 4.1; soft labels as in their AI-feedback
labels):  L = -(y log sigmoid(r_w - r_l) + (1 - y) log sigmoid(r_l - r_w)), r = the scalar reward
  read at the response's last token: the final hidden state times the head's column of the token
  ``train.reward_token`` (`reward`), a scalar head sharing the LM's parameters, so the preference model
  is an ordinary parameter tree (initialised, sharded, checkpointed and evaluated like the LM).

Soft labels: a batch's "label" (probability that y_w is preferred; 1 where the source has none) weighs
each pairwise term as y * f(d) + (1 - y) * f(-d) in all three losses (for ORPO and DPO this is the
conservative / label-smoothed form; at y = 1 it is the paper's loss).

Pairs are found by segment: packed or padded rows both work. Rows with no response tokens (padding
rows) count for nothing: the weight is the number of pairs with tokens on both sides.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from train.data import BATCH_KEYS, PAIR_KEYS
from train.data.preference import REFERENCE_FEATURES, PreferenceRecord, encode_preference
from train.objective import Loss, Objective, aux_parts, forward

CLAMP = -1e-6
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- numerics

def log1m_exp(l: jax.Array) -> jax.Array:
    """log(1 - e^l) for l <= 0, with l clamped to <= -1e-6: log(-expm1(l)) above -ln 2, log1p(-exp(l))
    below (Maechler 2012), each branch given a safe input so neither value nor gradient is ever NaN."""
    l = jnp.minimum(l.astype(jnp.float32), CLAMP)
    near = l > -LN2
    a = jnp.log(-jnp.expm1(jnp.where(near, l, -1.0)))
    b = jnp.log1p(-jnp.exp(jnp.where(near, -1.0, l)))
    return jnp.where(near, a, b)


def log_odds(l: jax.Array) -> jax.Array:
    """log(p / (1 - p)) of p = e^l: l - log(1 - e^l), l clamped to <= -1e-6 (`log1m_exp`)."""
    return jnp.minimum(l.astype(jnp.float32), CLAMP) - log1m_exp(l)


def soft_logsigmoid_loss(d: jax.Array, label) -> jax.Array:
    """-(y log sigmoid(d) + (1 - y) log sigmoid(-d)), elementwise."""
    return -(label * jax.nn.log_sigmoid(d) + (1.0 - label) * jax.nn.log_sigmoid(-d))


# ----------------------------------------------------------------------------- per-pair sums

def token_logps(model, mcfg, params, x: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) at every position, float32 [batch, seq], from final hidden states x [batch, seq, d]."""
    logits = model.head(params, x, mcfg).astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def segment_sums(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Sums of values [batch, seq] per (row, segment): [batch * seq], index row * seq + segment (slot
    row * seq + 0 collects padding)."""
    b, s = segment_ids.shape
    ids = (jnp.arange(b, dtype=jnp.int32)[:, None] * s + segment_ids).reshape(-1)
    return jax.ops.segment_sum(values.reshape(-1), ids, num_segments=b * s)


def last_token(segment_ids: jax.Array) -> jax.Array:
    """1.0 at the last position of each segment (segment id > 0), float32 [batch, seq]."""
    nxt = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    return ((segment_ids > 0) & (nxt != segment_ids)).astype(jnp.float32)


def pair_feature(batch: dict, key: str, default: float) -> jax.Array:
    """A per-pair float feature (spread over the chosen side's tokens) per (row, segment) [batch * seq]:
    its value at each segment's first token; ``default`` where the batch has no such key."""
    seg = batch["chosen_segment_ids"]
    if key not in batch:
        return jnp.full((seg.size,), default, jnp.float32)
    first = ((batch["chosen_positions"] == 0) & (seg > 0)).astype(jnp.float32)
    return segment_sums(batch[key].astype(jnp.float32) * first, seg)


def both_sides(batch: dict) -> dict:
    """The chosen rows then the rejected rows as one batch [2 x batch, seq] of BATCH_KEYS."""
    return {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]]) for k in BATCH_KEYS}


def pair_logps(model, mcfg, params, batch: dict, *, train=False, rng=None):
    """(log p(target) [2 x batch, seq] of the chosen then the rejected rows, final hidden states, aux):
    both sides through the model as one batch."""
    both = both_sides(batch)
    x, aux = forward(model, mcfg, params, both, train=train, rng=rng)
    return token_logps(model, mcfg, params, x, both["targets"]), x, aux


def side_stats(values: jax.Array, batch: dict, prompt_mask: bool = False) -> dict:
    """Per (row, segment) sums [batch * seq] of per-token ``values`` [2 x batch, seq] (chosen rows, then
    rejected rows) for each side: 'logp' (over the response: loss_mask) and 'tokens', and for the chosen
    side with ``prompt_mask`` also 'all_logp' / 'all_tokens' (every real token, the prompt included);
    'valid': 1.0 for pairs with response tokens on both sides."""
    n = batch["chosen_inputs"].shape[0]
    stats = {}
    for i, side in enumerate(("chosen", "rejected")):
        v = values[i * n:(i + 1) * n]
        seg, mask = batch[side + "_segment_ids"], batch[side + "_loss_mask"].astype(jnp.float32)
        stats[side] = {"logp": segment_sums(v * mask, seg), "tokens": segment_sums(mask, seg)}
        if prompt_mask and side == "chosen":
            real = (seg > 0).astype(jnp.float32)
            stats[side].update(all_logp=segment_sums(v * real, seg), all_tokens=segment_sums(real, seg))
    stats["valid"] = ((stats["chosen"]["tokens"] > 0) & (stats["rejected"]["tokens"] > 0)).astype(jnp.float32)
    return stats


def _finish(per_pair, valid, sums: dict, aux) -> Loss:
    pairs = jnp.sum(valid)
    extra, means = aux_parts(aux)
    loss = jnp.sum(per_pair * valid)
    return Loss(loss + pairs * extra, pairs, {"loss": loss, **{k: jnp.sum(v * valid) for k, v in sums.items()}},
                means)


# ----------------------------------------------------------------------------- ORPO

def orpo_terms(logp: jax.Array, batch: dict, *, lam: float, nll_on_prompt: bool = False):
    """(per-pair loss, valid, per-pair metrics), each [batch * seq], from per-token log-probs logp
    [2 x batch, seq] (chosen rows, then rejected rows)."""
    st = side_stats(logp, batch, prompt_mask=nll_on_prompt)
    c, r = st["chosen"], st["rejected"]
    l_w = c["logp"] / jnp.maximum(c["tokens"], 1.0)
    l_l = r["logp"] / jnp.maximum(r["tokens"], 1.0)
    ratio = log_odds(l_w) - log_odds(l_l)
    l_or = soft_logsigmoid_loss(ratio, pair_feature(batch, "label", 1.0))
    nll = (-c["all_logp"] / jnp.maximum(c["all_tokens"], 1.0)) if nll_on_prompt else -l_w
    sums = {"nll": nll, "or_loss": l_or, "log_odds_ratio": ratio, "chosen_logp": l_w, "rejected_logp": l_l,
            "accuracy": (ratio > 0).astype(jnp.float32)}
    return nll + lam * l_or, st["valid"], sums


def orpo_loss(model, mcfg, params, batch, *, lam: float, nll_on_prompt: bool = False, train=False, rng=None) -> Loss:
    """The ORPO loss summed over the batch's pairs (weight: pairs); see the module docstring."""
    logp, _, aux = pair_logps(model, mcfg, params, batch, train=train, rng=rng)
    return _finish(*orpo_terms(logp, batch, lam=lam, nll_on_prompt=nll_on_prompt), aux)


ORPO_LOGS = ("loss", "nll", "or_loss", "log_odds_ratio", "chosen_logp", "rejected_logp", "accuracy")


def orpo_objective(train_cfg=None, *, lam: float | None = None, nll_on_prompt: bool | None = None) -> Objective:
    """ORPO: ``lam`` (lambda) and ``nll_on_prompt`` default to ``train.orpo_lambda`` / ``train.orpo_nll_on_prompt``.
    Logs loss, nll (L_SFT), or_loss (L_OR), log_odds_ratio, chosen_logp / rejected_logp (mean per-token
    log-probs) and accuracy (share of pairs with log odds(y_w) > log odds(y_l)), each per pair."""
    lam = lam if lam is not None else train_cfg.orpo_lambda
    on_prompt = nll_on_prompt if nll_on_prompt is not None else train_cfg.orpo_nll_on_prompt

    def loss(model, mcfg, params, batch, *, train=False, rng=None) -> Loss:
        return orpo_loss(model, mcfg, params, batch, lam=lam, nll_on_prompt=on_prompt, train=train, rng=rng)

    return Objective("orpo", PAIR_KEYS, ORPO_LOGS, "pairs", loss)


# ----------------------------------------------------------------------------- DPO

def dpo_terms(logp: jax.Array, batch: dict, *, beta: float):
    """(per-pair loss, valid, per-pair metrics) of DPO from per-token log-probs [2 x batch, seq]."""
    st = side_stats(logp, batch)
    chosen_reward = beta * (st["chosen"]["logp"] - pair_feature(batch, "chosen_ref_logp", 0.0))
    rejected_reward = beta * (st["rejected"]["logp"] - pair_feature(batch, "rejected_ref_logp", 0.0))
    margin = chosen_reward - rejected_reward
    sums = {"margin": margin, "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
            "chosen_logp": st["chosen"]["logp"] / jnp.maximum(st["chosen"]["tokens"], 1.0),
            "rejected_logp": st["rejected"]["logp"] / jnp.maximum(st["rejected"]["tokens"], 1.0),
            "accuracy": (margin > 0).astype(jnp.float32)}
    return soft_logsigmoid_loss(margin, pair_feature(batch, "label", 1.0)), st["valid"], sums


def dpo_loss(model, mcfg, params, batch, *, beta: float, train=False, rng=None) -> Loss:
    """The DPO loss summed over pairs (weight: pairs), reference log-probs from the batch's
    ``chosen_ref_logp`` / ``rejected_ref_logp`` features."""
    logp, _, aux = pair_logps(model, mcfg, params, batch, train=train, rng=rng)
    return _finish(*dpo_terms(logp, batch, beta=beta), aux)


DPO_LOGS = ("loss", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp", "accuracy")


def dpo_objective(train_cfg=None, *, beta: float | None = None) -> Objective:
    """DPO with ``beta`` (default ``train.dpo_beta``); reads PAIR_KEYS and the reference features (a
    'preference' source with ``data.reference_logps=True``). Logs loss, margin (beta x the log-ratio
    difference), the implicit rewards, mean per-token log-probs and accuracy (margin > 0)."""
    beta = beta if beta is not None else train_cfg.dpo_beta

    def loss(model, mcfg, params, batch, *, train=False, rng=None) -> Loss:
        return dpo_loss(model, mcfg, params, batch, beta=beta, train=train, rng=rng)

    return Objective("dpo", PAIR_KEYS + REFERENCE_FEATURES, DPO_LOGS, "pairs", loss)


# ----------------------------------------------------------------------------- reference log-probs

def _padded_batches(records: Sequence[PreferenceRecord], tokenizer, seq_len: int, batch_size: int):
    """(batch of PAIR_KEYS, number of real rows) for each ``batch_size`` records, one pair per row, the last
    batch filled up with copies of its first pair."""
    from train.data.pipeline import _pad_example  # one padding layout for the pipeline and these passes

    rows = [_pad_example(encode_preference(r, tokenizer, seq_len, False), seq_len, tokenizer.pad_id,
                         ("chosen_", "rejected_")) for r in records]
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - n)
        yield {k: np.stack([row[k] for row in chunk]) for k in PAIR_KEYS}, n


def reference_logps(model, mcfg, ref_params, records: Sequence[PreferenceRecord], tokenizer, seq_len: int,
                    batch_size: int = 16) -> np.ndarray:
    """float32 [len(records), 2]: the summed response log-probs (chosen, rejected) of each pair under
    ``ref_params``, one pair per row, ``batch_size`` rows at a time."""

    @jax.jit
    def sums(params, batch):
        logp, _, _ = pair_logps(model, mcfg, params, batch)
        st = side_stats(logp, batch)
        per_row = lambda a: a.reshape(batch["chosen_inputs"].shape)[:, 1]  # noqa: E731  (segment 1 of each row)
        return jnp.stack([per_row(st["chosen"]["logp"]), per_row(st["rejected"]["logp"])], axis=-1)

    out = [np.asarray(sums(ref_params, b))[:n] for b, n in _padded_batches(records, tokenizer, seq_len, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 2), np.float32)


def evaluate_pairs(model, mcfg, params, records: Sequence[PreferenceRecord], tokenizer, seq_len: int,
                   batch_size: int = 16) -> dict[str, float]:
    """ORPO's per-pair metrics (log_odds_ratio, accuracy, chosen_logp, rejected_logp, ...) averaged over
    ``records``: how a model separates held-out pairs, whatever objective trained it."""

    @jax.jit
    def metrics(params, batch):
        logp, _, _ = pair_logps(model, mcfg, params, batch)
        _, valid, sums = orpo_terms(logp, batch, lam=0.0)
        per_row = lambda a: (a * valid).reshape(batch["chosen_inputs"].shape)[:, 1]  # noqa: E731
        return {k: per_row(v) for k, v in sums.items()}

    totals, count = {}, 0
    for b, n in _padded_batches(records, tokenizer, seq_len, batch_size):
        for k, v in metrics(params, b).items():
            totals[k] = totals.get(k, 0.0) + float(np.sum(np.asarray(v)[:n]))
        count += n
    return {k: v / max(count, 1) for k, v in totals.items()}


def add_reference_logps(model, mcfg, ref_params, in_path: str, out_path: str, tokenizer, seq_len: int,
                        batch_size: int = 16) -> int:
    """Copies the preference JSONL ``in_path`` to ``out_path`` with ``ref_chosen_logp`` and ``ref_rejected_logp``
    added to every record (`reference_logps`); returns the number of records."""
    from train.data.preference import parse_record
    from train.data.text import jsonl_objects

    objs, records = [], []
    for obj, where in jsonl_objects([in_path]):  # malformed lines: ValueError naming the file and line
        objs.append(obj)
        records.append(parse_record(obj, where))
    logps = reference_logps(model, mcfg, ref_params, records, tokenizer, seq_len, batch_size)
    with open(f"{out_path}.tmp", "w", encoding="utf-8") as f:  # renamed when complete: a rerun never sees half
        for obj, (c, r) in zip(objs, logps):
            f.write(json.dumps({**obj, "ref_chosen_logp": float(c), "ref_rejected_logp": float(r)}) + "\n")
    os.replace(f"{out_path}.tmp", out_path)
    return len(objs)


# ----------------------------------------------------------------------------- preference model

def reward(model, mcfg, params, x: jax.Array, reward_token: int) -> jax.Array:
    """The scalar head: head(x)[..., reward_token], float32 [batch, seq] (the final hidden state's score)."""
    return model.head(params, x, mcfg)[..., reward_token].astype(jnp.float32)


def bt_terms(r: jax.Array, batch: dict):
    """(per-pair soft-label Bradley-Terry loss, valid, metrics) from per-token rewards r [2 x batch, seq]
    (chosen rows, then rejected rows), each response scored at its last token."""
    last = jnp.concatenate([last_token(batch["chosen_segment_ids"]), last_token(batch["rejected_segment_ids"])])
    st = side_stats(r * last, {**batch, "chosen_loss_mask": jnp.ones_like(batch["chosen_loss_mask"]),
                               "rejected_loss_mask": jnp.ones_like(batch["rejected_loss_mask"])})
    valid = side_stats(jnp.zeros_like(r), batch)["valid"]
    d = st["chosen"]["logp"] - st["rejected"]["logp"]
    per_pair = soft_logsigmoid_loss(d, pair_feature(batch, "label", 1.0))
    return per_pair, valid, {"margin": d, "accuracy": (d > 0).astype(jnp.float32)}


def preference_model_loss(model, mcfg, params, batch, *, reward_token: int, train=False, rng=None) -> Loss:
    """Soft-label Bradley-Terry loss summed over pairs (weight: pairs), r read at each response's last token."""
    both = both_sides(batch)
    x, aux = forward(model, mcfg, params, both, train=train, rng=rng)
    return _finish(*bt_terms(reward(model, mcfg, params, x, reward_token), batch), aux)


def preference_model_objective(train_cfg=None, *, reward_token: int | None = None) -> Objective:
    """The preference model: soft-label Bradley-Terry on the scalar head of ``train.reward_token``. Logs loss,
    margin (r_w - r_l) and accuracy (r_w > r_l), per pair."""
    token = reward_token if reward_token is not None else train_cfg.reward_token

    def loss(model, mcfg, params, batch, *, train=False, rng=None) -> Loss:
        return preference_model_loss(model, mcfg, params, batch, reward_token=token, train=train, rng=rng)

    return Objective("preference_model", PAIR_KEYS, ("loss", "margin", "accuracy"), "pairs", loss)


def sequence_rewards(model, mcfg, params, tokens: jax.Array, last: jax.Array, reward_token: int) -> jax.Array:
    """The preference model's reward of each row of tokens [batch, seq] (positions from 0, no padding
    before the text), read at index ``last`` [batch] (the last real token): float32 [batch]."""
    x, _ = forward(model, mcfg, params, {"inputs": tokens})
    r = reward(model, mcfg, params, x, reward_token)
    return jnp.take_along_axis(r, last[:, None], axis=1)[:, 0]
