"""Attention dispatch: one entry point, several implementations of the same function.

softmax(q k^T / sqrt(d) + mask) v with grouped-query heads (Ainslie et al. 2023):
q [batch, q_len, heads, head_dim]; k, v [batch, kv_len, kv_heads, head_dim], heads a
multiple of kv_heads. The mask is causal in sequence index (query i sits at index
``q_start + i`` of the key sequence) and block-diagonal in segment ids, so packed
sequences never see each other and empty cache slots (segment 0) are never read by
real tokens.

Implementations:
  reference  plain einsums with a float32 softmax; the independent reference.
  xla        ``jax.nn.dot_product_attention(implementation="xla")``.
  cudnn      ``jax.nn.dot_product_attention(implementation="cudnn")``: flash attention on
             NVIDIA GPUs, bf16/fp16 only.
  auto       cached decoding steps on GPU: the ``pallas_decode`` kernel (where it takes the head_dim and
             the active layout); otherwise cudnn on GPU for half-precision inputs where cuDNN takes
             them, xla elsewhere (``auto_choice``).
  pallas_decode  for cached decoding steps (a few new tokens, q_len <= ``DECODE_MAX_Q``, against a
             longer cache) the fused Pallas kernel of ``models/decode_attention.py``: one kernel per
             layer (two with split-K), the stacked cache read in place (``kv_layer``); on GPU where
             the kernel takes the head_dim, in the Pallas interpreter elsewhere; ``auto`` for every
             other call (training, prefill).
  ring       Ring Attention (``parallel/ring_attention.py``): the sequence split along the mesh axis
             the ``seq`` rule maps to (``context``), keys and values passed around the ring; on one
             device the blockwise kernel of ``models/block_attention.py``.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def make_mask(q_len: int, kv_len: int, q_start, q_segment_ids, kv_segment_ids) -> jax.Array:
    """Boolean [batch or 1, 1, q_len, kv_len]: causal by index, equal segments only."""
    q_idx = q_start + jnp.arange(q_len)[:, None]
    mask = (jnp.arange(kv_len)[None, :] <= q_idx)[None, None]
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & same[:, None]
    return mask


def reference(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_start=0):
    b, s, h, d = q.shape
    t, kvh = k.shape[1], k.shape[2]
    qg = q.reshape(b, s, kvh, h // kvh, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(d))
    mask = make_mask(s, t, q_start, q_segment_ids, kv_segment_ids)[:, :, None]  # [b,1,1,s,t]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h, d)


def _plain_causal(q, k, q_segment_ids, q_start) -> bool:
    """Whether the mask is causal alone (no segments, no cache offset): no mask array is needed."""
    return q_segment_ids is None and q.shape[1] == k.shape[1] and isinstance(q_start, int) and q_start == 0


def _library(implementation):
    def attend(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_start=0):
        s, t = q.shape[1], k.shape[1]
        plain_causal = _plain_causal(q, k, q_segment_ids, q_start)
        mask = None if plain_causal else make_mask(s, t, q_start, q_segment_ids, kv_segment_ids)
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=plain_causal, implementation=implementation
        )

    return attend


def auto_choice(q, k, *, on_gpu: bool, q_segment_ids=None, q_start=0, **_) -> str:
    """The implementation ``auto`` takes outside cached decoding steps on GPU: cuDNN flash attention for
    half-precision training and prefill on GPU; XLA otherwise (a cached call, where cuDNN would take its mask
    over the cache as a dense bias, and a segment mask over an odd length, which cuDNN refuses in training)."""
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    uncached = q.shape[1] == k.shape[1] and isinstance(q_start, int)
    even = q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0
    return "cudnn" if on_gpu and half and uncached and (even or _plain_causal(q, k, q_segment_ids, q_start)) else "xla"


DECODE_MAX_Q = 16  # the most new tokens per row that ``pallas_decode`` sends to the kernel


def is_decode_step(q, k) -> bool:
    """Whether a call is a cached decoding step: at most DECODE_MAX_Q queries against a longer key axis (the cache)."""
    return q.shape[1] <= DECODE_MAX_Q and k.shape[-3] > q.shape[1]


def _one_layer(k, v, kv_layer, dtype):
    """k, v of layer ``kv_layer`` of a stacked cache (as they are when None), in ``dtype``."""
    if kv_layer is not None:
        k, v = (jax.lax.dynamic_index_in_dim(t, kv_layer, 0, keepdims=False) for t in (k, v))
    return k.astype(dtype), v.astype(dtype)


def _decode_or_auto(q, k, v, *, kv_layer=None, gpu_only: bool, **kw):
    """``auto`` (gpu_only) and ``pallas_decode``: a cached decoding step through the decode kernel (on GPU
    where it takes the head_dim and the active layout; off GPU in the interpreter unless ``gpu_only``);
    every other call cuDNN or XLA by ``auto_choice``."""
    from models import decode_attention  # imported on use: Pallas only when selected

    if jax.default_backend() == "gpu":
        usable = decode_attention.supports(q.shape[-1]) and (
            not gpu_only or decode_attention.layout_problem(q.shape[0], q.shape[2], k.shape[-2]) is None)
    else:
        usable = not gpu_only
    if usable and is_decode_step(q, k):
        q_seg = kw.get("q_segment_ids")
        return decode_attention.decode_attention(q, k, v, kw.get("q_start", 0), q_seg,
                                                 None if q_seg is None else kw.get("kv_segment_ids"), layer=kv_layer)
    k, v = _one_layer(k, v, kv_layer, q.dtype)
    return IMPLEMENTATIONS[auto_choice(q, k, on_gpu=jax.default_backend() == "gpu", **kw)](q, k, v, **kw)


def _ring(q, k, v, **kw):
    from parallel import ring_attention  # imported on use: parallel/ builds on models/

    return ring_attention.attend(q, k, v, **kw)


IMPLEMENTATIONS: dict[str, Callable] = {
    "reference": reference,
    "xla": _library("xla"),
    "cudnn": _library("cudnn"),
    # the decode kernel on GPU only (H200, 1.26B: 1.14x the XLA step at batch 1, 1.26x at batch 64)
    "auto": functools.partial(_decode_or_auto, gpu_only=True),
    "pallas_decode": functools.partial(_decode_or_auto, gpu_only=False),
    "ring": _ring,
}
READS_STACKED = ("auto", "pallas_decode")  # the implementations that take ``kv_layer`` (a stacked cache)


def attention(q, k, v, *, implementation: str = "auto", q_segment_ids=None, kv_segment_ids=None, q_start=0,
              kv_layer=None):
    """Dispatch to ``IMPLEMENTATIONS[implementation]``; returns [batch, q_len, heads, head_dim].

    ``kv_layer`` (int or int32 scalar): k, v are a stacked cache [layers, batch, kv_len, kv_heads,
    head_dim] and that layer is read (by ``pallas_decode`` in place, sliced out for the others); k, v
    are cast to q's dtype."""
    kw = dict(q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, q_start=q_start)
    if implementation in READS_STACKED:
        return IMPLEMENTATIONS[implementation](q, k, v, kv_layer=kv_layer, **kw)
    return IMPLEMENTATIONS[implementation](q, *_one_layer(k, v, kv_layer, q.dtype), **kw)
