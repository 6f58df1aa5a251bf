"""Ring Attention: exact attention over a sequence sharded along a mesh axis.

Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(2023). Each of the N devices of the ring axis holds one block of queries, keys and values
([batch, s, heads, head_dim] with s = seq / N). Over N steps the key/value blocks travel around
the ring (``ppermute`` to the next device) while each device attends its queries to the block it
holds, with the blockwise kernel of ``models/block_attention.py`` (FlashAttention-style tiles, a
float32 log-sum-exp per row), and folds the result into a running float32 max, denominator and
numerator (the online softmax, ``block_attention.combine``). The send of the next block is issued
before the current block's compute, so that the transfer hides behind it. On GPU the blocks go
through the same kernel written in Pallas (``models/flash_kernel.py``; ``ring_attention``'s ``kernel``).

The backward pass (``custom_vjp``) runs the ring again: keys and values go round once more,
together with float32 accumulators of their gradients, so each device adds its queries' share of
dK, dV to the block it holds (``block_attention.backward``, from the global log-sum-exp L and
delta = rowsum(dO * O) saved by the forward), and after N steps each dK, dV block is back home.
Memory per device stays proportional to its block.

Layouts (which global positions a device's block holds; the causal mask is by global position):
  contiguous  device i holds chunk i of N. With a causal mask, device i attends to i + 1 of the N
              blocks: the last device works N steps, the first one.
  zigzag      the sequence is cut into 2N chunks and device i holds chunks i and 2N-1-i (the
              "zigzag" layout of ring-flash-attention and of Llama 3's context parallelism; Brandon
              et al. 2023's striped layout is the other balanced choice). Every step then costs
              every device the same: at its own block a causal tile; from a device
              j < i all its queries attend to the first half of j's keys (the second half is in
              their future); from j > i only its second half of queries attends, to all of j's
              keys. Blocks the mask hides entirely are skipped (``lax.switch``, not masked).
``zigzag`` / ``unzigzag`` move a contiguously sharded [batch, seq, ...] array into this layout and
back with two ``ppermute``s each; ``models/transformer.py`` does this once around the layer stack.

``ring_attention`` is a function of local blocks and the ring's mesh axis name, to be called
inside ``shard_map``; ``attend`` is the entry ``models/attention.py`` dispatches ``attention="ring"``
to: it wraps the ring in ``jax.shard_map`` over the active mesh (``parallel.sharding.active()``),
the ring axis being the one the ``seq`` rule maps to (``context`` in the default rules).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from models import block_attention as blk
from models import flash_kernel
from parallel import sharding

LAYOUTS = ("contiguous", "zigzag")
KERNELS = ("auto", "xla", "pallas")
BLOCK_Q = BLOCK_K = 512


class RingSpec(NamedTuple):
    """The static part of a ring call."""
    axis_name: str | tuple | None
    causal: bool
    layout: str
    block_q: int
    block_k: int
    scale: float | None
    kernel: object = "xla"  # the per-block kernel: "xla" (block_attention) or a flash_kernel.Config (Pallas)


# ----------------------------------------------------------------------------- layout

def axis_size(axis_name) -> int:
    """Devices on the ring (1 without an axis); inside ``shard_map``."""
    return 1 if axis_name is None else jax.lax.psum(1, axis_name)


def positions(index, s: int, n: int, layout: str):
    """Global positions [s] of the block that device ``index`` of ``n`` holds."""
    if layout == "contiguous" or n == 1:
        return index * s + jnp.arange(s)
    c = s // 2
    return jnp.concatenate([index * c + jnp.arange(c), (2 * n - 1 - index) * c + jnp.arange(c)])


def _zigzag_home(chunk: int, n: int) -> int:
    """The device that holds contiguous chunk ``chunk`` (of 2n) in the zigzag layout."""
    return chunk if chunk < n else 2 * n - 1 - chunk


def zigzag_local(x, axis_name, axis: int = 1):
    """Inside ``shard_map``: a block of a contiguously sharded sequence (chunks 2i, 2i+1 of 2N on
    device i) -> the zigzag block (chunks i, 2N-1-i). Chunk 2i travels by one ``ppermute``, chunk
    2i+1 by another; device j receives chunk j by the one of j's parity."""
    n = axis_size(axis_name)
    if n == 1:
        return x
    first, second = jnp.split(x, 2, axis=axis)
    a = jax.lax.ppermute(first, axis_name, [(i, _zigzag_home(2 * i, n)) for i in range(n)])
    b = jax.lax.ppermute(second, axis_name, [(i, _zigzag_home(2 * i + 1, n)) for i in range(n)])
    even = jax.lax.axis_index(axis_name) % 2 == 0
    return jnp.where(even, jnp.concatenate([a, b], axis), jnp.concatenate([b, a], axis))


def unzigzag_local(x, axis_name, axis: int = 1):
    """Inverse of ``zigzag_local``."""
    n = axis_size(axis_name)
    if n == 1:
        return x
    lo, hi = jnp.split(x, 2, axis=axis)  # chunks j and 2N-1-j: opposite parities
    even = jax.lax.axis_index(axis_name) % 2 == 0
    even_chunk, odd_chunk = jnp.where(even, lo, hi), jnp.where(even, hi, lo)
    a = jax.lax.ppermute(even_chunk, axis_name, [(_zigzag_home(2 * i, n), i) for i in range(n)])
    b = jax.lax.ppermute(odd_chunk, axis_name, [(_zigzag_home(2 * i + 1, n), i) for i in range(n)])
    return jnp.concatenate([a, b], axis)


# ----------------------------------------------------------------------------- the ring

def block_kernel(kernel, lengths, head_dim: int, dtype) -> object:
    """The per-block kernel ``kernel`` names for blocks of ``lengths``: "xla" (``block_attention``) or a
    ``flash_kernel.Config`` (the Pallas kernels). "auto" takes Pallas on GPU for half-precision inputs
    where its tiles fit (``flash_kernel.supports``), XLA otherwise (float32 matmuls in the kernel would
    run in full float32); "pallas" takes the default Config; a Config is taken as given."""
    if isinstance(kernel, flash_kernel.Config):
        return kernel
    if kernel not in KERNELS:
        raise ValueError(f"ring kernel {kernel!r} is unknown; use one of {KERNELS} or a flash_kernel.Config.")
    if kernel == "auto":
        half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        on_gpu = jax.default_backend() == "gpu"
        return flash_kernel.Config() if on_gpu and half and flash_kernel.supports(lengths, head_dim) else "xla"
    return flash_kernel.Config() if kernel == "pallas" else "xla"


def _kernels(spec: RingSpec):
    """(forward, backward) of one block, with the spec's scale and tiles bound."""
    if spec.kernel == "xla":
        kw = dict(scale=spec.scale, block_q=spec.block_q, block_k=spec.block_k)
        return functools.partial(blk.forward, **kw), functools.partial(blk.backward, **kw)
    kw = dict(scale=spec.scale, config=spec.kernel)
    return functools.partial(flash_kernel.forward, **kw), functools.partial(flash_kernel.backward, **kw)


def _rotate(tree, axis_name, n: int):
    """Send every array of ``tree`` to the next device of the ring (device i -> i + 1 mod n)."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, axis_name, perm), tree)


def _branch(index, step):
    """Which kind of step (0: own block, 1: block of an earlier device, 2: of a later one) device
    ``index`` takes at ring step ``step`` (it then holds the block of device (index - step) mod n)."""
    return jnp.where(step == 0, 0, jnp.where(step <= index, 1, 2))


def _half(x, which: int):
    return jnp.split(x, 2, axis=1)[which]


def _pad_half(x, which: int, fill=0.0):
    """A full-length array holding ``x`` as its first (0) or second (1) half along axis 1, ``fill`` elsewhere."""
    other = blk.fill(x.shape, fill, x).astype(x.dtype)
    return jnp.concatenate([x, other] if which == 0 else [other, x], axis=1)


def _forward_step(spec: RingSpec, q, kv, q_idx, q_seg, branch):
    """(o, lse) of this device's queries against the key/value block ``kv`` it holds now."""
    k, v, k_idx, k_seg = kv
    forward, _ = _kernels(spec)
    full = functools.partial(forward, q, k, v, q_idx, k_idx, q_seg, k_seg)
    if not spec.causal or spec.axis_name is None:  # without a ring a device holds its own block only
        return full(causal=spec.causal)
    b, s, h, d = q.shape

    def own(_):
        return full(causal=True)

    if spec.layout == "contiguous":
        def earlier(_):
            return full(causal=False)

        def later(_):  # entirely in the future: nothing to attend
            return blk.fill((b, s, h, d), 0.0, q), blk.fill((b, s, h), blk.NEG_INF, q)
    else:
        def earlier(_):  # all queries, the first half of the keys
            return forward(q, _half(k, 0), _half(v, 0), q_idx, _half(k_idx[None], 0)[0], q_seg,
                           None if k_seg is None else _half(k_seg, 0), causal=False)

        def later(_):  # the second half of the queries, all keys
            o, lse = forward(_half(q, 1), k, v, _half(q_idx[None], 1)[0], k_idx,
                             None if q_seg is None else _half(q_seg, 1), k_seg, causal=False)
            return _pad_half(o, 1), _pad_half(lse, 1, blk.NEG_INF)

    return jax.lax.switch(branch, (own, earlier, later), None)


def _backward_step(spec: RingSpec, q, kv, do, lse, delta, q_idx, q_seg, branch):
    """(dq, dk, dv) float32 of this device's queries against the block ``kv`` it holds now."""
    k, v, k_idx, k_seg = kv
    _, backward = _kernels(spec)
    full = functools.partial(backward, q, k, v, do, lse, delta, q_idx, k_idx, q_seg, k_seg)
    if not spec.causal or spec.axis_name is None:
        return full(causal=spec.causal)

    def own(_):
        return full(causal=True)

    if spec.layout == "contiguous":
        def earlier(_):
            return full(causal=False)

        def later(_):
            return blk.fill(q.shape, 0.0, q), blk.fill(k.shape, 0.0, k), blk.fill(v.shape, 0.0, v)
    else:
        def earlier(_):
            dq, dk, dv = backward(q, _half(k, 0), _half(v, 0), do, lse, delta, q_idx, _half(k_idx[None], 0)[0],
                                  q_seg, None if k_seg is None else _half(k_seg, 0), causal=False)
            return dq, _pad_half(dk, 0), _pad_half(dv, 0)

        def later(_):
            h1 = lambda a: None if a is None else _half(a, 1)  # noqa: E731
            dq, dk, dv = backward(h1(q), k, v, h1(do), h1(lse), h1(delta), _half(q_idx[None], 1)[0], k_idx,
                                  h1(q_seg), k_seg, causal=False)
            return _pad_half(dq, 1), dk, dv

    return jax.lax.switch(branch, (own, earlier, later), None)


def _tie(*arrays):
    """The arrays through one ``optimization_barrier``, so that positions and segment ids depend on
    q, k, v: masks built from them are then computed where they are used, never hoisted as constant
    residuals out of a differentiated layer scan (see ``block_attention.loop``)."""
    return jax.lax.optimization_barrier(arrays)


def _ring_forward(spec: RingSpec, q, k, v, q_seg, k_seg):
    n = axis_size(spec.axis_name)
    index = jnp.int32(0) if n == 1 else jax.lax.axis_index(spec.axis_name)
    b, s, h, d = q.shape
    q_idx = positions(index, s, n, spec.layout)
    q, k, v, q_idx, q_seg, k_seg = _tie(q, k, v, q_idx, q_seg, k_seg)
    kv = (k, v, q_idx, k_seg)  # every device starts with its own block: the same positions as its queries

    def step(t, carry):
        state, kv = carry
        nxt = _rotate(kv, spec.axis_name, n)  # issued first: the transfer overlaps the compute below
        o, lse = _forward_step(spec, q, kv, q_idx, q_seg, _branch(index, t))
        return blk.combine(state, o, lse), nxt

    state = blk.init_state(b, s, h, d, q)
    if n > 1:
        state, kv = blk.loop(n - 1, step, (state, kv))
    o, lse = _forward_step(spec, q, kv, q_idx, q_seg, _branch(index, n - 1))
    return blk.finish(blk.combine(state, o, lse))


def _ring_backward(spec: RingSpec, q, k, v, q_seg, k_seg, o, lse, do):
    n = axis_size(spec.axis_name)
    index = jnp.int32(0) if n == 1 else jax.lax.axis_index(spec.axis_name)
    s = q.shape[1]
    q_idx = positions(index, s, n, spec.layout)
    q, k, v, q_idx, q_seg, k_seg = _tie(q, k, v, q_idx, q_seg, k_seg)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [b, s, h]
    kv = (k, v, q_idx, k_seg)
    zeros = blk.fill(k.shape, 0.0, k)

    def grads(dq, kv, dkv, t):
        dq_b, dk_b, dv_b = _backward_step(spec, q, kv, do, lse, delta, q_idx, q_seg, _branch(index, t))
        dkv = (dkv[0] + dk_b, dkv[1] + dv_b)
        return dq + dq_b, _rotate(dkv, spec.axis_name, n) if n > 1 else dkv

    def step(t, carry):
        dq, kv, dkv = carry
        nxt = _rotate(kv, spec.axis_name, n)
        dq, dkv = grads(dq, kv, dkv, t)
        return dq, nxt, dkv

    carry = (blk.fill(q.shape, 0.0, q), kv, (zeros, zeros))
    if n > 1:
        carry = blk.loop(n - 1, step, carry)
    dq, kv, dkv = carry
    dq, (dk, dv) = grads(dq, kv, dkv, n - 1)  # the last rotation brings dK, dV home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring(q, k, v, q_seg, k_seg, spec: RingSpec):
    o, _ = _ring_forward(spec, q, k, v, q_seg, k_seg)
    return o.astype(q.dtype)


def _ring_fwd(q, k, v, q_seg, k_seg, spec):
    o, lse = _ring_forward(spec, q, k, v, q_seg, k_seg)
    o = o.astype(q.dtype)
    return o, (q, k, v, q_seg, k_seg, o, lse)


def _ring_bwd(spec, res, do):
    q, k, v, q_seg, k_seg, o, lse = res
    dq, dk, dv = _ring_backward(spec, q, k, v, q_seg, k_seg, o, lse, do)
    return dq, dk, dv, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, axis_name=None, causal: bool = True,
                   layout: str = "zigzag", block_q: int = BLOCK_Q, block_k: int = BLOCK_K, scale=None, kernel="auto"):
    """Exact softmax(q k^T * scale + mask) v over a sequence split along ``axis_name``; call inside
    ``shard_map`` (with ``axis_name=None``: one device, the blockwise kernel alone).

    q [batch, s, heads, head_dim]; k, v [batch, s, kv_heads, head_dim]: this device's block in
    ``layout`` (the whole sequence is N x s long); q/kv_segment_ids [batch, s] or None. The mask:
    causal by global position (with ``causal``) and equal segment ids. Returns [batch, s, heads,
    head_dim] in q's dtype; differentiable in q, k, v (``custom_vjp``). ``kernel``: the per-block kernel
    (``block_kernel``: "auto", "xla" with tiles ``block_q`` x ``block_k``, "pallas", or a ``flash_kernel.Config``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"ring layout {layout!r} is unknown; use one of {LAYOUTS}.")
    if q.shape[1] != k.shape[1] or (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(f"ring attention needs query and key blocks of one length (got {q.shape[1]} and "
                         f"{k.shape[1]}) and segment ids for both or neither; it has no cached decoding.")
    if layout == "zigzag" and axis_name is not None and q.shape[1] % 2:
        raise ValueError(f"the zigzag layout splits each device's block in two, but it has {q.shape[1]} "
                         f"positions; use a sequence length divisible by 2 x the ring size.")
    halves = layout == "zigzag" and causal and axis_name is not None  # other devices' zigzag steps: half blocks
    kernel = block_kernel(kernel, (q.shape[1], q.shape[1] // 2) if halves else (q.shape[1],), q.shape[3], q.dtype)
    return _ring(q, k, v, q_segment_ids, kv_segment_ids,
                 RingSpec(axis_name, causal, layout, block_q, block_k, scale, kernel))


# ----------------------------------------------------------------------------- model integration

_LAYOUT: contextvars.ContextVar = contextvars.ContextVar("loom_ring_layout", default="contiguous")


@contextlib.contextmanager
def sequence_layout(layout: str):
    """Within this context (while tracing) ``attend`` takes the sequence to be in ``layout``; the
    caller has put it there (``zigzag``). Outside, sequences are in order (``contiguous``)."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def ring_axis():
    """(mesh, rules, ring mesh axes, ring size) for the active layout: the axes the ``seq`` rule maps
    to; size 1 (no ring) without an active mesh."""
    layout = sharding.active()
    if layout is None:
        return None, None, None, 1
    mesh, rules = layout
    axes = sharding._targets(sharding.logical_to_spec(("seq",), rules)[0])
    return mesh, rules, (axes[0] if len(axes) == 1 else tuple(axes)) if axes else None, sharding.logical_size("seq")


def length_multiple(n: int, layout: str = "zigzag") -> int:
    """What a ring of ``n`` devices needs the sequence length to be a multiple of: 2 n chunks in the balanced
    zigzag layout, n in the contiguous one (1 without a ring)."""
    return 1 if n <= 1 else 2 * n if layout == "zigzag" else n


def check_length(seq_len: int, n: int, layout: str = "zigzag", what: str = "train.seq_len") -> None:
    """ValueError unless a ring of ``n`` devices can split ``seq_len`` in ``layout``."""
    parts = length_multiple(n, layout)
    if seq_len % parts:
        why = (f"2 x the {n} devices of the context ring: the balanced zigzag layout gives each device two chunks"
               if layout == "zigzag" else f"the {n} devices of the context ring")
        raise ValueError(f"{what} ({seq_len}) is not divisible by {parts} ({why}); make it a multiple of {parts}.")


def _map(fn, x_specs, out_specs, mesh):
    return jax.shard_map(fn, mesh=mesh, in_specs=x_specs, out_specs=out_specs, check_vma=False)


def _seq_spec(ndim: int, rules) -> PartitionSpec:
    """The spec of a [batch, seq, ...] activation: batch and seq by the rules, the rest replicated."""
    return sharding.logical_to_spec(("batch", "seq") + (None,) * (ndim - 2), rules)


def needs_zigzag() -> bool:
    """Whether ``models.transformer.blocks`` should move the sequence into the zigzag layout: a ring
    of more than one device is active and the sequence is not in that layout already."""
    return ring_axis()[3] > 1 and _LAYOUT.get() != "zigzag"


def zigzag(x):
    """A [batch, seq, ...] array sharded along seq by the active rules, moved into the zigzag layout
    (identity without a ring)."""
    mesh, rules, axis, n = ring_axis()
    if n == 1 or x is None:
        return x
    check_length(x.shape[1], n, what="the sequence length")
    spec = _seq_spec(x.ndim, rules)
    return _map(functools.partial(zigzag_local, axis_name=axis), (spec,), spec, mesh)(x)


def unzigzag(x):
    """Inverse of ``zigzag``."""
    mesh, rules, axis, n = ring_axis()
    if n == 1 or x is None:
        return x
    spec = _seq_spec(x.ndim, rules)
    return _map(functools.partial(unzigzag_local, axis_name=axis), (spec,), spec, mesh)(x)


def attend(q, k, v, *, q_segment_ids=None, kv_segment_ids=None, q_start=0):
    """``models.attention`` entry for ``attention="ring"``: causal ring attention over the active
    mesh's ring axis, the sequence in the layout ``sequence_layout`` says; the blockwise kernel on
    one device when there is no ring. Cached decoding (queries at a cache offset, or fewer queries
    than cache slots; the cache is not split along the ring) takes ``attention="auto"``."""
    if not (isinstance(q_start, int) and q_start == 0) or q.shape[1] != k.shape[1]:
        # Cached decoding and prefill: queries against a cache that is not split along the ring.
        from models.attention import IMPLEMENTATIONS
        return IMPLEMENTATIONS["auto"](q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                       q_start=q_start)
    mesh, rules, axis, n = ring_axis()
    layout = _LAYOUT.get()
    kw = dict(causal=True, layout=layout)
    if n == 1:
        return ring_attention(q, k, v, q_segment_ids, kv_segment_ids, axis_name=None, **kw)
    check_length(q.shape[1], n, layout, what="the sequence length")
    q_spec = sharding.logical_to_spec(("batch", "seq", "heads", "head_dim"), rules)
    kv_spec = sharding.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), rules)
    seg_spec = _seq_spec(2, rules)

    def local(q, k, v, qs, ks):
        return ring_attention(q, k, v, qs, ks, axis_name=axis, **kw)

    segs = q_segment_ids is not None
    specs = (q_spec, kv_spec, kv_spec) + ((seg_spec, seg_spec) if segs else ())
    fn = local if segs else (lambda q, k, v: local(q, k, v, None, None))
    args = (q, k, v) + ((q_segment_ids, kv_segment_ids) if segs else ())
    return _map(fn, specs, q_spec, mesh)(*args)
