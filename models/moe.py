"""Switch Transformer mixture-of-experts layer (Fedus, Zoph & Shazeer 2021), router z-loss from ST-MoE (Zoph et al. 2022).

The layer replaces the dense SwiGLU MLP of a block; the residual add is the caller's. For
token x with router weights W_r [d_model, N] (N experts) the router computes, in float32
whatever the compute dtype (Switch sec. 2.4, "selective precision"),

    h(x) = x W_r,    p_i(x) = exp(h_i(x)) / sum_j exp(h_j(x))                (Switch eq. 1)
    y    = sum_{i in top-k(p(x))} g_i(x) E_i(x),  E_i = SwiGLU expert i       (Switch eq. 2)

with g_i = p_i (Switch: k = 1 uses the raw probability; for k > 1 the top-k probabilities
are used as they are, or renormalised to sum to 1 with ``normalize_gates``).

Routing groups. Tokens [batch, seq] are flattened batch-major and cut into groups of
``group_size`` consecutive tokens. Each expert takes at most

    C = min(group_size, ceil(capacity_factor * group_size * k / N))         (Switch eq. 3)

tokens per group (rounded up, so capacity_factor 1.0 never drops a perfectly balanced
group). Slots go by position in the group, and for k > 1 all first choices before any
second choice; a token-choice that finds its expert full is dropped: its output is 0 and
the residual connection carries the token. Nothing depends on how many devices there are.

Auxiliary losses, per group of T tokens and averaged over groups (Switch eq. 4-6):

    f_i = 1/(k T) sum_x [i in top-k(p(x))],   P_i = 1/T sum_x p_i(x),
    aux_loss = alpha N sum_i f_i P_i        (alpha = aux_loss_coef; equals alpha when balanced)
    z_loss   = beta mean_x (log sum_j exp h_j(x))^2                          (ST-MoE eq. 5)

f_i counts the router's choices before capacity (it has no gradient; P_i carries it).

Two dispatch paths give the same y when nothing is dropped:
  * ``capacity``: gather tokens into [groups, experts, capacity, d] buffers, one batched
    matmul per weight, gather back. With a mesh whose ``experts`` rule names an axis of
    size > 1 the expert matmuls run expert-parallel (``parallel/expert.py``).
  * ``dropless``: sort token-choices by expert and run a grouped matmul (``grouped_matmul``,
    ``jax.lax.ragged_dot`` here; the one function to swap for a faster GPU kernel); no
    token is dropped. For decoding, where the token count need not be a multiple of
    ``group_size``, the aux statistics then treat all tokens as one group.

Expert dropout (Switch sec. 2.4, table 4) is dropout on each expert's hidden activations;
on the capacity path its masks are keyed by (group, expert) buffer, so they too do not
depend on the mesh. The hidden activations carry checkpoint name "mlp_hidden" like the
dense MLP's, so the model's remat policies treat them alike.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from models import capture, layers
from parallel import expert as expert_parallel
from parallel import sharding

DISPATCH = ("capacity", "dropless")
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Switch layer hyperparameters; frozen and hashable (a static jit argument). Validated on construction.

    num_experts: N. top_k: experts per token (Switch: 1). capacity_factor_train/eval: C as
    above, in training / evaluation. group_size: tokens per routing group (must divide
    batch*seq on the capacity path). dispatch: "capacity" or "dropless". aux_loss_coef:
    alpha. z_loss_coef: beta. expert_dropout: dropout rate inside experts (training only).
    init_scale / router_init_scale: s in the truncated-normal init std = sqrt(s / fan_in)
    (Switch sec. 2.4: s = 0.1). normalize_gates: renormalise the top-k gates to sum 1 (k > 1
    only). every: every k-th layer of the model is an MoE layer (1: all; 2: Switch's every
    other), layers every-1, 2*every-1, ... (0-based).
    """

    num_experts: int = 8
    top_k: int = 1
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    group_size: int = 1024
    dispatch: str = "capacity"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    expert_dropout: float = 0.0
    init_scale: float = 0.1
    router_init_scale: float = 0.1
    normalize_gates: bool = False
    every: int = 1

    def __post_init__(self):
        validate(self)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def validate(cfg: MoEConfig) -> None:
    """Raise ValueError with one sentence naming the ``moe.`` field and the fix."""
    for name in ("num_experts", "top_k", "group_size", "every"):
        v = getattr(cfg, name)
        if not _is_int(v) or v <= 0:
            raise ValueError(f"moe.{name} is {v!r}; set it to a positive integer.")
    if cfg.top_k > cfg.num_experts:
        raise ValueError(f"moe.top_k ({cfg.top_k}) exceeds moe.num_experts ({cfg.num_experts}); set top_k <= "
                         f"num_experts.")
    if cfg.dispatch not in DISPATCH:
        raise ValueError(f"moe.dispatch is {cfg.dispatch!r}; use one of {list(DISPATCH)}.")
    if cfg.dispatch == "capacity":
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            v = getattr(cfg, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"moe.{name} is {v!r} but the capacity path needs a positive factor; set it > 0 "
                                 f"(1.0 = exactly balanced capacity) or use moe.dispatch='dropless'.")
    for name in ("aux_loss_coef", "z_loss_coef"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"moe.{name} is {v!r}; set it to a number >= 0 (0 turns the loss off).")
    if not isinstance(cfg.expert_dropout, (int, float)) or not 0 <= cfg.expert_dropout < 1:
        raise ValueError(f"moe.expert_dropout is {cfg.expert_dropout!r}; set it in [0, 1).")
    for name in ("init_scale", "router_init_scale"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"moe.{name} is {v!r}; set it to a positive number (Switch uses 0.1).")
    if cfg.normalize_gates and cfg.top_k == 1:
        raise ValueError("moe.normalize_gates with moe.top_k=1 makes every gate 1 and leaves the router no gradient "
                         "from the task loss; set normalize_gates=False or top_k > 1.")


def validate_mesh(cfg: MoEConfig, mesh: jax.sharding.Mesh, rules: sharding.Rules, *,
                  tokens: int | None = None) -> None:
    """Refuse a mesh the layer cannot use, before compiling: the checks ``apply`` meets when it
    traces (ValueError naming the field and the fix). With ``tokens`` (batch x seq of one forward)
    on the capacity path, they must form whole routing groups and, with experts over a mesh axis,
    the groups must split over the devices (``parallel.expert.check``, which also checks that the
    experts split over that axis)."""
    groups = None
    if tokens is not None and cfg.dispatch == "capacity":
        _check_groups(cfg, tokens)
        groups = tokens // cfg.group_size
    expert_parallel.check(cfg.num_experts, groups, mesh, rules)


def _check_groups(cfg: MoEConfig, tokens: int) -> None:
    if tokens % cfg.group_size:
        raise ValueError(f"moe.group_size ({cfg.group_size}) does not divide the tokens of a (micro)batch, batch x "
                         f"seq = {tokens}; choose a divisor of it (e.g. the sequence length) or "
                         f"moe.dispatch='dropless'.")


def moe_layers(cfg: MoEConfig, n_layers: int) -> tuple[int, ...]:
    """0-based indices of the model's MoE layers: every ``cfg.every``-th, the last of each run of ``every``."""
    return tuple(range(cfg.every - 1, n_layers, cfg.every))


def capacity(cfg: MoEConfig, group_size: int, train: bool) -> int:
    """Expert capacity C per group: ceil(factor * group_size * top_k / N), at least 1, at most group_size.

    The product is rounded to 9 decimals before the ceiling, so 1.1 * 10 / 1 is 11, not 12.
    """
    factor = cfg.capacity_factor_train if train else cfg.capacity_factor_eval
    c = math.ceil(round(factor * group_size * cfg.top_k / cfg.num_experts, 9))
    return max(1, min(c, group_size))


# ----------------------------------------------------------------------------- parameters

def _trunc_normal(rng, shape, fan_in: int, scale: float, dtype) -> jax.Array:
    """Truncated normal with std sqrt(scale / fan_in) before truncation at 2 std (as tf.truncated_normal)."""
    return (jax.random.truncated_normal(rng, -2.0, 2.0, shape, jnp.float32) * np.sqrt(scale / fan_in)).astype(dtype)


def init(cfg: MoEConfig, rng: jax.Array, d_model: int, d_ff: int, n_layers: int, param_dtype="float32") -> dict:
    """Stacked parameters of ``n_layers`` MoE layers (the MoE layers only; see ``moe_layers``).

    router [L, d_model, N]; w_gate, w_up [L, N, d_model, d_ff]; w_down [L, N, d_ff, d_model].
    Truncated normal, std sqrt(0.1 / fan_in) (``init_scale``, ``router_init_scale``).
    """
    pd = layers.DTYPES.get(param_dtype, param_dtype) if isinstance(param_dtype, str) else param_dtype
    L, D, F, E = n_layers, d_model, d_ff, cfg.num_experts
    k = jax.random.split(rng, 4)
    return {
        "router": _trunc_normal(k[0], (L, D, E), D, cfg.router_init_scale, pd),
        "w_gate": _trunc_normal(k[1], (L, E, D, F), D, cfg.init_scale, pd),
        "w_up": _trunc_normal(k[2], (L, E, D, F), D, cfg.init_scale, pd),
        "w_down": _trunc_normal(k[3], (L, E, F, D), F, cfg.init_scale, pd),
    }


def param_axes(cfg: MoEConfig | None = None) -> dict:
    """Logical axis names, same structure as ``init``. The router's expert axis is small and stays replicated."""
    return {
        "router": ("layers", "embed", None),
        "w_gate": ("layers", "experts", "embed", "mlp"),
        "w_up": ("layers", "experts", "embed", "mlp"),
        "w_down": ("layers", "experts", "mlp", "embed"),
    }


# ----------------------------------------------------------------------------- routing

class Routing(NamedTuple):
    """The router's decisions for [G groups, S tokens]; k = top_k, N = num_experts.

    logits, probs: [G, S, N] float32. experts: [G, S, k] int32, best first. gates: [G, S, k]
    float32 combine weights (top-k probabilities, renormalised with ``normalize_gates``).
    slots: [G, S, k] int32 position in the expert's buffer (capacity path; None when
    dropless). keep: [G, S, k] bool, False where the expert was full.
    """

    logits: jax.Array
    probs: jax.Array
    experts: jax.Array
    gates: jax.Array
    slots: jax.Array | None
    keep: jax.Array


def route(router: jax.Array, xg: jax.Array, cfg: MoEConfig, cap: int | None) -> Routing:
    """Router for xg [G, S, d] (any dtype) with weights router [d, N]; ``cap`` = C, or None for no capacity."""
    logits = layers.linear(router, xg.astype(jnp.float32), jnp.float32, precision=jax.lax.Precision.HIGHEST,
                           name="router")
    probs = jax.nn.softmax(logits, axis=-1)
    gates, experts = jax.lax.top_k(probs, cfg.top_k)
    if cfg.normalize_gates:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    if cap is None:
        return Routing(logits, probs, experts, gates, None, jnp.ones(experts.shape, bool))
    slots = _slots(experts, cfg.num_experts)
    return Routing(logits, probs, experts, gates, slots, slots < cap)


def _slots(experts: jax.Array, n: int) -> jax.Array:
    """Position of each token-choice among those sent to the same expert in its group, in priority
    order (choice j of every token before choice j+1; within a choice, by position). [G, S, k] -> [G, S, k]."""
    G, S, k = experts.shape
    onehot = jax.nn.one_hot(experts.transpose(0, 2, 1).reshape(G, k * S), n, dtype=jnp.int32)  # [G, kS, N]
    pos = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)
    return pos.reshape(G, k, S).transpose(0, 2, 1)


def router_aux(r: Routing, cfg: MoEConfig) -> dict:
    """Scalar losses and metrics (float32) from the routing of [G, S] tokens; see the module docstring.

    aux_loss: alpha N sum_i f_i P_i (mean over groups). z_loss: beta mean logsumexp(h)^2.
    dropped_fraction: share of token-choices dropped for capacity. With load_i = f_i averaged
    over groups (the router's choices, before capacity): load_min, load_max (both 1/N when
    balanced) and load_entropy = -sum load_i log load_i / log N (1 balanced, 0 all on one expert).
    """
    n, k = cfg.num_experts, cfg.top_k
    chosen = jnp.sum(jax.nn.one_hot(r.experts, n, dtype=jnp.float32), axis=2)  # [G, S, N], 0/1
    f = jnp.mean(chosen, axis=1) / k  # [G, N]
    p = jnp.mean(r.probs, axis=1)  # [G, N]
    z = jax.nn.logsumexp(r.logits, axis=-1)
    load = jnp.mean(f, axis=0)
    entropy = -jnp.sum(jnp.where(load > 0, load * jnp.log(jnp.where(load > 0, load, 1.0)), 0.0))
    return {
        "aux_loss": cfg.aux_loss_coef * n * jnp.mean(jnp.sum(f * p, axis=-1)),
        "z_loss": cfg.z_loss_coef * jnp.mean(jnp.square(z)),
        "dropped_fraction": 1.0 - jnp.mean(r.keep.astype(jnp.float32)),
        "load_min": jnp.min(load),
        "load_max": jnp.max(load),
        "load_entropy": entropy / np.log(n) if n > 1 else jnp.ones((), jnp.float32),
    }


# ----------------------------------------------------------------------------- capacity path

def _slot_index(r: Routing, n: int, cap: int) -> jax.Array:
    """Flat buffer index e*C + slot of each token-choice, n*C (out of range) where dropped. [G, S, k]."""
    return jnp.where(r.keep, r.experts * cap + r.slots, n * cap)


def dispatch(xg: jax.Array, r: Routing, n: int, cap: int) -> jax.Array:
    """Gather tokens into buffers: xg [G, S, d] -> [G, N, C, d]; empty slots are 0."""
    G, S, d = xg.shape
    dest = _slot_index(r, n, cap).reshape(G, -1)
    token = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[:, None], r.experts.shape[1:]).reshape(-1)
    # Which token fills each slot (S = none); dropped choices point past the end and are skipped.
    src = jax.vmap(lambda dst: jnp.full((n * cap,), S, jnp.int32).at[dst].set(token, mode="drop"))(dest)
    buf = jnp.take_along_axis(xg, src[..., None], axis=1, mode="fill", fill_value=0)
    return buf.reshape(G, n, cap, d)


def combine(out: jax.Array, r: Routing, cap: int) -> jax.Array:
    """y[g, s] = sum_j keep * gate_j * out[g, e_j, slot_j]: out [G, N, C, d] -> float32 [G, S, d]."""
    G, n, _, d = out.shape
    S, k = r.experts.shape[1:]
    idx = _slot_index(r, n, cap).reshape(G, S * k, 1)
    got = jnp.take_along_axis(out.reshape(G, n * cap, d), idx, axis=1, mode="fill", fill_value=0)
    w = jnp.where(r.keep, r.gates, 0.0)
    return jnp.sum(got.reshape(G, S, k, d).astype(jnp.float32) * w[..., None], axis=2)


def _dropout(h: jax.Array, keep_mask: jax.Array, rate: float) -> jax.Array:
    return jnp.where(keep_mask, h / (1.0 - rate), 0).astype(h.dtype)


def expert_ffn(w: dict, buf: jax.Array, ids=(), rng=(), *, rate: float = 0.0, filled=None) -> jax.Array:
    """SwiGLU of each expert on its slots: buf [G, N', C, d] with w_* [N', ...] -> [G, N', C, d] (buf's dtype).

    With ``rate`` > 0, ids [G, N'] int32 name each (group, expert) buffer and the dropout mask
    of its hidden [C, d_ff] is drawn from fold_in(rng, id), the same on any mesh. ``filled``
    [G, N', C] bool (under ``capture`` only): the slots holding a token, for per-expert statistics.
    """
    if filled is not None:
        experts = jnp.where(filled, jnp.arange(buf.shape[1])[:, None], buf.shape[1])
        capture.linear_input("w_gate", buf, segment_ids=experts, num_segments=buf.shape[1])
        capture.linear_input("w_up", buf, segment_ids=experts, num_segments=buf.shape[1])
    h = jax.nn.silu(layers.linear(w["w_gate"], buf, experts=True)) * layers.linear(w["w_up"], buf, experts=True)
    if rate > 0:
        shape = h.shape[2:]
        bits = jax.vmap(jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - rate, shape)))
        h = _dropout(h, bits(ids), rate)
    h = checkpoint_name(h, "mlp_hidden")
    if filled is not None:
        capture.linear_input("w_down", h, segment_ids=experts, num_segments=buf.shape[1])
    return layers.linear(w["w_down"], h, experts=True)


def _capacity_path(p: dict, xg: jax.Array, r: Routing, cfg: MoEConfig, cap: int, rng, rate: float) -> jax.Array:
    G, n = xg.shape[0], cfg.num_experts
    buf = dispatch(xg, r, n, cap)
    w = {name: p[name] for name in EXPERT_WEIGHTS}
    ids, key = (jnp.arange(G * n, dtype=jnp.int32).reshape(G, n), rng) if rate > 0 else ((), ())
    if capture.active():  # one device's view: taps cannot leave a shard_map
        per_expert = jnp.sum(jax.nn.one_hot(r.experts, n, dtype=jnp.int32) * r.keep[..., None], axis=(1, 2))
        filled = jnp.arange(cap) < per_expert[:, :, None]  # [G, N, C]: slots fill from 0
        return combine(expert_ffn(w, buf, ids, key, rate=rate, filled=filled), r, cap)

    def fn(w, b, i, k):
        return expert_ffn(w, b, i, k, rate=rate)

    active = sharding.active()
    plan = expert_parallel.check(n, G, *active) if active is not None else None
    if plan is None:
        out = fn(w, buf, ids, key)
    else:
        axis, gaxes = plan
        out = expert_parallel.expert_parallel(fn, w, buf, ids, key, mesh=active[0], axis=axis, gaxes=gaxes)
    return combine(out, r, cap)


# ----------------------------------------------------------------------------- dropless path

grouped_matmul = layers.grouped_matmul


def _dropless_path(p: dict, x: jax.Array, r: Routing, cfg: MoEConfig, rng, rate: float) -> jax.Array:
    """x [T, d] tokens, routing of [1 or G, ...] tokens flattened to T -> float32 [T, d]; no token dropped."""
    T, _ = x.shape
    k, n = cfg.top_k, cfg.num_experts
    choice = r.experts.reshape(T * k)  # token-major: row t*k + j
    order = jnp.argsort(choice, stable=True)
    sizes = jnp.bincount(choice, length=n).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)
    row_expert = jnp.take(choice, order)
    for name in ("w_gate", "w_up"):
        capture.linear_input(name, xs, segment_ids=row_expert, num_segments=n)
    h = jax.nn.silu(layers.linear(p["w_gate"], xs, group_sizes=sizes)) * layers.linear(p["w_up"], xs,
                                                                                         group_sizes=sizes)
    if rate > 0:
        mask = jax.random.bernoulli(rng, 1.0 - rate, (T * k, h.shape[-1]))
        h = _dropout(h, jnp.take(mask, order, axis=0), rate)
    h = checkpoint_name(h, "mlp_hidden")
    capture.linear_input("w_down", h, segment_ids=row_expert, num_segments=n)
    out = layers.linear(p["w_down"], h, group_sizes=sizes)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(T * k, dtype=order.dtype))
    out = jnp.take(out, inverse, axis=0).reshape(T, k, -1)
    return jnp.sum(out.astype(jnp.float32) * r.gates.reshape(T, k, 1), axis=1)


# ----------------------------------------------------------------------------- the layer

def apply(p: dict, x: jax.Array, cfg: MoEConfig, *, train: bool, rng: jax.Array | None = None):
    """One Switch layer: x [batch, seq, d_model] (compute dtype) -> (y [batch, seq, d_model], aux).

    p: one layer's slice of ``init``'s params. ``train`` picks the capacity factor and turns
    on expert dropout (which then needs ``rng``). y has x's dtype and excludes the residual.
    aux: float32 scalars aux_loss, z_loss (already scaled by their coefficients; add both to
    the task loss), dropped_fraction, load_min, load_max, load_entropy (see ``router_aux``).
    Under an active mesh (``parallel.sharding.activate``) whose ``experts`` rule names an
    axis of size > 1, the capacity path runs the experts expert-parallel; same results.
    """
    b, s, d = x.shape
    tokens = b * s
    rate = float(cfg.expert_dropout) if train else 0.0
    if rate > 0 and rng is None:
        raise ValueError(f"moe.expert_dropout is {cfg.expert_dropout} and train=True, so apply needs rng=; pass a "
                         f"PRNG key or set expert_dropout=0.")
    if cfg.dispatch == "dropless":
        group = cfg.group_size if tokens % cfg.group_size == 0 else tokens
        r = route(p["router"], x.reshape(tokens // group, group, d), cfg, None)
        y = _dropless_path(p, x.reshape(tokens, d), r, cfg, rng, rate)
    else:
        _check_groups(cfg, tokens)
        cap = capacity(cfg, cfg.group_size, train)
        xg = x.reshape(tokens // cfg.group_size, cfg.group_size, d)
        r = route(p["router"], xg, cfg, cap)
        y = _capacity_path(p, xg, r, cfg, cap, rng, rate)
    return y.reshape(b, s, d).astype(x.dtype), router_aux(r, cfg)
