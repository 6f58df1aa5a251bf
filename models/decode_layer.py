"""The Transformer's cached step for one token of one row as six kernels (``models/decode_matmul.py``), and the
out-major layout of its weights that the kernels read.

    decode_qkv      RMSNorm, W_qkv, the rotation of q and k, k and v written into the stacked cache in place
    attention       ``cfg.attention`` (two kernels with split-K)
    W_o             + the residual
    W_gate_up       RMSNorm before, SwiGLU after
    W_down          + the residual

A layer takes it when ``cfg.decode`` asks for it ("pallas", or "auto" on a GPU without an active mesh), the
kernels take the config's shapes in its compute dtype, and its four projections are all plain arrays (stored as
``weights.OutMajor``: W^T in the compute dtype) or all ``awq.Int4`` matrices of uint32 words in one group size
(``Int4.to_out_major``). ``models.transformer.decode_params`` lays them out for one row only (``out_major``): XLA's
products for more rows read the [in, out] layout faster (the 350M at batch 64 on an H200: 0.9%).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models import awq, capture, decode_matmul, layers, weights
from models.attention import attention

WEIGHTS = ("wqkv", "wo", "w_gate_up", "w_down")  # the layer's four projections (``decode_params``' joined names)


def fits(cfg, group: int = 0) -> bool:
    """Whether ``cfg.decode`` asks for the six-kernel layer here and ``decode_matmul``'s kernels take the config's
    shapes in its compute dtype (with int4 weights in groups of ``group``)."""
    if cfg.decode == "xla" or (cfg.decode == "auto" and not layers.decode_kernels()):
        return False
    d, f, heads_dim, dtype = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim, cfg.compute_dtype
    plan = functools.partial(decode_matmul.plan, 1, dtype=dtype, out_major=True, group=group)
    return (decode_matmul.qkv_plan(d, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, dtype, group) is not None
            and None not in (plan(heads_dim, d), plan(d, 2 * f, glu=True), plan(f, d)))


def _group(p: dict, cfg, laid_out: bool) -> int | None:
    """The int4 group of the layer's four projections (0: plain), when all four are of one form the kernels take in
    this config (``laid_out``: already out-major, else not yet); else None."""
    groups = set()
    for w in (p.get(n) for n in WEIGHTS):
        if isinstance(w, weights.OutMajor if laid_out else jax.Array):
            groups.add(0)
        elif (isinstance(w, awq.Int4) and w.out_major == laid_out and w.packed.ndim == 2
              and w.packed.dtype == jnp.uint32):
            groups.add(w.group)
        else:
            return None
    group = groups.pop() if len(groups) == 1 else None
    return group if group is not None and fits(cfg, group) else None


def out_major(p: dict, cfg) -> dict:
    """One layer's weights (``decode_params``' dict, W_qkv and W_gate_up joined) with its four projections out-major
    where the layer takes the six kernels; else ``p`` as it is."""
    if _group(p, cfg, laid_out=False) is None:
        return p
    return {**p, **{n: p[n].to_out_major() if isinstance(p[n], awq.Int4)
                    else weights.OutMajor(p[n].T.astype(cfg.compute_dtype)) for n in WEIGHTS}}


def takes(p: dict, x: jax.Array, cfg) -> bool:
    """Whether a cached step of this layer runs as ``layer``: one token of one row in the compute dtype, the weights
    laid out by ``out_major``, a config the kernels take, no ``capture``."""
    return (x.shape[:2] == (1, 1) and x.dtype == cfg.compute_dtype and not capture.active()
            and _group(p, cfg, laid_out=True) is not None)


def _operand(w):
    """``decode_matmul``'s operand for an out-major weight: W^T, or the int4 (packed, scale, zero)."""
    return w.t if isinstance(w, weights.OutMajor) else (w.packed, w.scale, w.zero)


def layer(p: dict, x: jax.Array, cfg, *, positions, segment_ids, cache, cache_index, cache_segment_ids, cache_layer):
    """``transformer.decoder_layer``'s cached step as six kernels (module docstring), for a layer that ``takes`` it:
    x [1, 1, d_model]; cache {'k', 'v'} stacked [layers, 1, max_len, kv_heads, head_dim], layer ``cache_layer``
    written at ``cache_index``. Returns (x, {'k', 'v'}, {})."""
    w = {n: _operand(p[n]) for n in WEIGHTS}
    q, k, v = decode_matmul.decode_qkv(x, p["attn_norm"], w["wqkv"], cache["k"], cache["v"], heads=cfg.n_heads,
                                       kv_heads=cfg.n_kv_heads, position=positions[0, 0], index=cache_index,
                                       layer=cache_layer, theta=cfg.rope_theta, eps=cfg.norm_eps)
    o = attention(q, k, v, implementation=cfg.attention, q_segment_ids=segment_ids, kv_segment_ids=cache_segment_ids,
                  q_start=cache_index, kv_layer=cache_layer)
    fused = functools.partial(decode_matmul.decode_matmul, out_major=True)
    x = fused(o.reshape(x.shape[:2] + (-1,)), w["wo"], residual=x)
    hidden = fused(x, w["w_gate_up"], norm=p["mlp_norm"], eps=cfg.norm_eps, glu=True)
    return fused(hidden, w["w_down"], residual=x), {"k": k, "v": v}, {}
