"""Blockwise attention with a float32 log-sum-exp as Pallas (Triton) kernels for NVIDIA GPUs.

The GPU version of ``models/block_attention.py`` (same arguments, same results): the per-block kernel
of Ring Attention (``parallel/ring_attention.py``), written the FlashAttention-2 way (Dao 2023,
algorithm 1 forward, algorithm 2 backward split into two kernels). For a query row i and the keys j
of this block:

    s_ij = q_i . k_j * scale   (masked: -inf)        lse_i = log sum_j exp(s_ij)
    o_i  = sum_j exp(s_ij - lse_i) v_j

and from the cotangent do, the *global* log-sum-exp L and delta_i = do_i . o_i of the whole row:

    p_ij = exp(s_ij - L_i)   dv_j = sum_i p_ij do_i   ds_ij = p_ij (do_i . v_j - delta_i)
    dq_i = scale sum_j ds_ij k_j                      dk_j = scale sum_i ds_ij q_i

Kernels (exponentials in base 2: exp(x) = exp2(x log2 e); the forward takes the scores unscaled and
applies c = scale log2 e in the row max and, per score, in one multiply-add: exp2(s c - m)):
  forward  one program per (query tile of ``block_q`` rows, batch row, head), heaviest tiles first;
           an online softmax over key tiles of ``block_k`` (running max, denominator, numerator in
           float32); writes o and lse in float32.
  dk, dv   one program per (key tile of ``dkdv_block_k``, batch row, kv head): loops over the query
           heads of its group and their query tiles of ``dkdv_block_q``, accumulating dk, dv in float32.
  dq       one program per (query tile of ``dq_block_q``, batch row, head), heaviest first: loops over
           key tiles of ``dq_block_k``, accumulating dq in float32.
  fused    with ``fused_dq`` there is no dq kernel: the dk, dv kernel also forms each step's dq
           partial ds k ([``dkdv_block_q``, d] float32, as (k^T ds)^T so that every tile shape runs it
           as a Hopper wgmma reading k from shared memory) and adds it to dq atomically
           (FlashAttention-2's own choice: 5 matmuls per pair of tiles instead of 7, one exponential
           instead of two; the order of the additions, so dq's last bits, varies from run to run).
           Pallas orders atomics acquire-release, which sm_90 compiles to a GPU-wide memory barrier
           before each vector atomic: what that costs is measured against the two kernels.
Programs run in the order of ``_programs`` (``group``: tile-major over groups of (batch row, head) pairs).
Masks come from integer positions (causal: k_idx <= q_idx) and optional segment ids. Positions
increase along the block, so for each tile the key (or query) tiles that the causal mask hides
entirely are a contiguous range, found from the tiles' first and last positions (in XLA, before the
kernel) and never visited; tiles the causal mask leaves whole are run without building a mask. This
holds for any increasing positions, as a ring step gives (keys entirely earlier, partly masked, or
shifted), not only the diagonal of one sequence.

Shapes: q [batch, sq, heads, head_dim]; k, v [batch, sk, kv_heads, head_dim] (heads a multiple of
kv_heads; query head h reads kv head h // (heads // kv_heads)); q_idx [sq], k_idx [sk] integers;
q_seg [batch, sq], k_seg [batch, sk] or None; lse, delta [batch, sq, heads] float32. Scores,
statistics and all outputs are float32; probabilities enter the second matmul in v's (do's) dtype.
Tiles are powers of two of at least 16 that divide the lengths (``supports``); head_dim is padded
with zeros to a power of two. ``interpret=True`` (the default off GPU) runs the same kernels in the
Pallas interpreter (tests on CPU).

The other Pallas kernels (``decode_attention``, ``int4_kernel``, ``scan_kernel``) share this module's small
helpers: ``dot``, ``dot_t`` (float32-accumulating tile products), ``is_pow2``, ``resolve_interpret``,
``compiler_params`` and ``sm_count``.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NEG_INF = -jnp.inf


class Config(NamedTuple):
    """Tile sizes and Triton launch parameters (hashable: a static argument)."""
    block_q: int = 128        # forward: query rows per program
    block_k: int = 64         # forward: keys per loop step
    num_warps: int = 8
    num_stages: int = 3
    dkdv_block_k: int = 128   # dk, dv: key rows per program
    dkdv_block_q: int = 64    # dk, dv: query rows per loop step
    dkdv_num_warps: int = 8
    dkdv_num_stages: int = 3
    dq_block_q: int = 128     # dq: query rows per program
    dq_block_k: int = 32      # dq: key rows per loop step
    dq_num_warps: int = 8
    dq_num_stages: int = 3
    fused_dq: str = ""        # "atomic": dq by atomic adds in the dk, dv kernel (dq_* unused)
    group: int = 0            # > 0: programs tile-major over groups of this many (batch row, head) pairs


def _tile(n: int, block: int) -> int:
    return min(block, n)


def is_pow2(n: int) -> bool:
    """Whether n is a power of two (Triton's block shapes must be)."""
    return n >= 1 and n & (n - 1) == 0


def block_size(n: int, most: int) -> int:
    """The largest power of 2 that divides n and is at most ``most`` (a block of rows, channels or inputs)."""
    size = 1
    while size * 2 <= most and n % (size * 2) == 0:
        size *= 2
    return size


def _bad_tile(n: int, block: int) -> str | None:
    t = _tile(n, block)
    if n % t or not is_pow2(t) or t < 16:
        return f"it cuts a length of {n} into tiles of {t}, not a power of two of at least 16 that divides it"
    return None


FUSED_DQ = ("", "atomic")


def _check(sq: int, sk: int, config: Config) -> None:
    if config.fused_dq not in FUSED_DQ:
        raise ValueError(f"Config.fused_dq={config.fused_dq!r} is unknown; use one of {FUSED_DQ}.")
    pairs = ((sq, config.block_q), (sk, config.block_k), (sk, config.dkdv_block_k), (sq, config.dkdv_block_q))
    if not config.fused_dq:
        pairs += ((sq, config.dq_block_q), (sk, config.dq_block_k))
    for n, block in pairs:
        why = _bad_tile(n, block)
        if why:
            raise ValueError(f"the Pallas attention kernel cannot tile this block: {why}; use lengths that are "
                             f"multiples of 128 (or powers of two of at least 16), or kernel='xla'.")


def supports(lengths, head_dim: int, config: Config = Config()) -> bool:
    """Whether query and key blocks of every length in ``lengths`` split into this config's tiles, and
    ``head_dim`` is at most 128 (the tiles of a larger one would outgrow an H100/H200's shared memory)."""
    if head_dim > 128:
        return False
    try:
        for n in lengths:
            _check(n, n, config)
    except ValueError:
        return False
    return True


def _programs(n: int, b: int, h: int, group: int):
    """(grid, tile axis, wrap) of programs over n tiles x b batch rows x h heads. group = 0: grid (n, b, h),
    the tiles of one (batch row, head) pair launched together (the tile id varies fastest), so the
    heaviest and lightest tiles alternate in every wave and the last wave holds a whole pair's tiles;
    group = G > 0: grid (G', n, b h / G') with G' = gcd(G, b h), tile-major within a group of G' pairs
    (heaviest first across the group: the last wave holds the group's lightest tiles, the group's
    keys and values stay in L2). ``wrap`` turns an index map over (tile, batch row, head) into one
    over the grid."""
    if not group:
        return (n, b, h), 0, lambda f: f
    g = math.gcd(group, b * h)

    def wrap(f):
        return lambda x, i, z: f(i, (z * g + x) // h, (z * g + x) % h)

    return (g, n, b * h // g), 1, wrap


def _wrap_specs(specs, wrap):
    return [pl.BlockSpec(s.block_shape, wrap(s.index_map)) for s in specs]


def sm_count() -> int:
    """Streaming multiprocessors of the first device, which the Pallas kernels' grid heuristics aim to fill;
    132 (an H100's or H200's) where the device reports none (CPU: the interpreter, a lowering for CUDA)."""
    return getattr(jax.devices()[0], "core_count", None) or 132


def resolve_interpret(interpret) -> bool:
    """A kernel's ``interpret`` argument: None runs the Pallas interpreter off GPU, else as given."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def ptx(op: str, x):
    """The PTX instruction ``op`` (one float32 operand, e.g. ``ex2.approx.ftz``) elementwise over float32 x."""
    [y] = plgpu.elementwise_inline_asm(f"{op}.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
                                       result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, F32)])
    return y


def exp2(x, fast: bool):
    """2^x over float32 x: with ``fast`` (a GPU kernel) one ``ex2.approx.ftz`` instruction (PTX: about 2^-22 relative
    error; results under 2^-126 are 0), else ``jnp.exp2`` (the interpreter; on the GPU libdevice's ``exp2f``, which
    keeps subnormal results at the cost of more instructions)."""
    return ptx("ex2.approx.ftz", x) if fast else jnp.exp2(x)


def softplus(v, fast: bool):
    """log(1 + e^v) over float32 v, stable for any v: max(v, 0) + log(1 + e), e = exp(-|v|); for e < 2^-6, log(1 + e)
    is its series e - e^2/2 + e^3/3 (1 + e would round e away). ``fast``: the PTX ``ex2.approx``/``lg2.approx``
    instructions (``exp2``), a GPU kernel only."""
    e = exp2(-jnp.abs(v) * LOG2E, fast)
    log1pe = (ptx("lg2.approx", 1.0 + e) if fast else jnp.log2(1.0 + e)) * LN2
    return jnp.maximum(v, 0.0) + jnp.where(e < 2.0 ** -6, e * (1.0 - e * (0.5 - e / 3.0)), log1pe)


def compiler_params(interpret: bool, warps: int, stages: int):
    """Triton compiler parameters of a ``pallas_call`` (None in the interpreter)."""
    return None if interpret else plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _pad_dim(x, dp: int):
    d = x.shape[-1]
    return x if d == dp else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dp - d)])


def _ends(idx, t: int):
    """First and last positions of each length-``t`` tile of ``idx`` [n]."""
    r = idx.reshape(-1, t)
    return r[:, 0], r[:, -1]


def _key_ranges(q_idx, k_idx, tq: int, tk: int):
    """Per query tile: (key tiles [0, full) entirely visible, [full, vis) partly visible) under the causal mask."""
    qf, ql = _ends(q_idx, tq)
    kf, kl = _ends(k_idx, tk)
    full = jnp.searchsorted(kl, qf, side="right").astype(jnp.int32)
    vis = jnp.searchsorted(kf, ql, side="right").astype(jnp.int32)
    return full, jnp.maximum(vis, full)


def _query_ranges(q_idx, k_idx, tq: int, tk: int):
    """Per key tile: (query tiles [lo, full) partly visible, [full, nq) entirely visible) under the causal mask."""
    qf, ql = _ends(q_idx, tq)
    kf, kl = _ends(k_idx, tk)
    lo = jnp.searchsorted(ql, kf, side="left").astype(jnp.int32)
    full = jnp.searchsorted(qf, kl, side="left").astype(jnp.int32)
    return lo, jnp.maximum(full, lo)


def dot_t(a, b):
    """a [m, d] . b [n, d]^T -> float32 [m, n]."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=F32)


def dot(a, b):
    """a [m, n] . b [n, d] -> float32 [m, d]."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=F32)


def dot_tn(a, b):
    """a [n, m]^T . b [n, d] -> float32 [m, d]."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=F32)


def _mask(q_pos, k_pos, q_seg, k_seg, causal: bool):
    """Boolean [tq, tk] (or None): k_pos <= q_pos where ``causal``, equal segments where given."""
    mask = (k_pos[None, :] <= q_pos[:, None]) if causal else None
    if q_seg is not None:
        same = q_seg[:, None] == k_seg[None, :]
        mask = same if mask is None else mask & same
    return mask


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(*refs, nq, tk, c, causal, has_seg, tile_axis):
    """One (query tile, batch row, head). refs: q [tq, d]; k, v [sk, d]; q_idx [tq]; k_idx [sk];
    q_seg [tq]?, k_seg [sk]?; full, vis [nq]? -> o [tq, d] f32, lse [tq] f32."""
    q_ref, k_ref, v_ref, qi_ref, ki_ref, *refs = refs
    qs_ref, ks_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
    full_ref, vis_ref = (refs.pop(0), refs.pop(0)) if causal else (None, None)
    o_ref, lse_ref = refs
    q = q_ref[...]
    q_pos = qi_ref[...]
    q_seg = None if qs_ref is None else qs_ref[...]
    tq, d = q.shape

    def body(j, carry, masked):
        m, l, acc = carry
        sl = pl.ds(j * tk, tk)
        s = dot_t(q, k_ref[sl, :])  # unscaled: c > 0 enters the row max and, per score, one multiply-add
        mask = _mask(q_pos, ki_ref[sl] if masked else None, q_seg, None if ks_ref is None else ks_ref[sl], masked)
        if mask is not None:
            s = jnp.where(mask, s, NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1) * c)  # log2 units
        # a row can only be wholly masked (m_new = -inf) under a mask
        m_safe = m_new if mask is None else jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.exp2(s * c - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        v = v_ref[sl, :]
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((tq,), NEG_INF, F32), jnp.zeros((tq,), F32), jnp.zeros((tq, d), F32))
    if causal:
        t = nq - 1 - pl.program_id(tile_axis)
        full, vis = full_ref[t], vis_ref[t]
        carry = jax.lax.fori_loop(0, full, functools.partial(body, masked=False), init)
        m, l, acc = jax.lax.fori_loop(full, vis, functools.partial(body, masked=True), carry)
    else:
        m, l, acc = jax.lax.fori_loop(0, k_ref.shape[0] // tk, functools.partial(body, masked=False), init)
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    o_ref[...] = acc / safe_l[:, None]
    lse_ref[...] = jnp.where(empty, NEG_INF, (jnp.where(m == NEG_INF, 0.0, m) + jnp.log2(safe_l)) * LN2)


def forward(q, k, v, q_idx, k_idx, q_seg=None, k_seg=None, *, causal: bool = True, scale: float | None = None,
            config: Config = Config(), interpret=None):
    """(o float32 [b, sq, heads, d], lse float32 [b, sq, heads]) of one block, as
    ``block_attention.forward``: rows that see no key get o = 0 and lse = -inf."""
    interpret = resolve_interpret(interpret)
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    _check(sq, sk, config)
    scale = d ** -0.5 if scale is None else scale
    if not scale > 0:
        raise ValueError(f"the Pallas attention kernel takes a positive scale, not {scale}.")
    dp = max(16, pl.next_power_of_2(d))
    q, k, v = (_pad_dim(x, dp) for x in (q, k, v))
    tq, tk = _tile(sq, config.block_q), _tile(sk, config.block_k)
    nq = sq // tq
    has_seg = q_seg is not None
    sqz = pl.squeezed
    rev = lambda i: nq - 1 - i  # noqa: E731  heaviest (latest) query tiles first under the causal mask
    in_specs = [pl.BlockSpec((sqz, tq, sqz, dp), lambda i, bi, hi: (bi, rev(i), hi, 0)),
                pl.BlockSpec((sqz, sk, sqz, dp), lambda i, bi, hi: (bi, 0, hi // g, 0)),
                pl.BlockSpec((sqz, sk, sqz, dp), lambda i, bi, hi: (bi, 0, hi // g, 0)),
                pl.BlockSpec((tq,), lambda i, bi, hi: (rev(i),)),
                pl.BlockSpec((sk,), lambda i, bi, hi: (0,))]
    args = [q, k, v, q_idx.astype(jnp.int32), k_idx.astype(jnp.int32)]
    if has_seg:
        in_specs += [pl.BlockSpec((sqz, tq), lambda i, bi, hi: (bi, rev(i))),
                     pl.BlockSpec((sqz, sk), lambda i, bi, hi: (bi, 0))]
        args += [q_seg.astype(jnp.int32), k_seg.astype(jnp.int32)]
    if causal:
        in_specs += [pl.BlockSpec((nq,), lambda i, bi, hi: (0,))] * 2
        args += list(_key_ranges(q_idx, k_idx, tq, tk))
    grid, tile_axis, wrap = _programs(nq, b, h, config.group)
    kernel = functools.partial(_fwd_kernel, nq=nq, tk=tk, c=scale * LOG2E, causal=causal, has_seg=has_seg,
                               tile_axis=tile_axis)
    out_specs = [pl.BlockSpec((sqz, tq, sqz, dp), lambda i, bi, hi: (bi, rev(i), hi, 0)),
                 pl.BlockSpec((sqz, sqz, tq), lambda i, bi, hi: (bi, hi, rev(i)))]
    o, lse = pl.pallas_call(
        kernel, grid=grid, in_specs=_wrap_specs(in_specs, wrap), out_specs=_wrap_specs(out_specs, wrap),
        out_shape=[jax.ShapeDtypeStruct((b, sq, h, dp), F32), jax.ShapeDtypeStruct((b, h, sq), F32)],
        interpret=interpret, compiler_params=compiler_params(interpret, config.num_warps, config.num_stages),
        name="flash_attention_fwd")(*args)
    return o[..., :d], jnp.swapaxes(lse, 1, 2)


# ----------------------------------------------------------------------------- backward

def _dkdv_kernel(*refs, g, ti, c, scale, causal, has_seg, fused_dq, tile_axis):
    """One (key tile, batch row, kv head). refs: q, do [sq, g, d]; k, v [tk, d]; L2, delta [g, sq];
    q_idx [sq]; k_idx [tk]; q_seg [sq]?, k_seg [tk]?; lo, full [nk]?; dq [sq, g, d] f32 (fused_dq: the
    zeros aliased to the output) -> dk, dv [tk, d] f32, and with fused_dq dq [sq, g, d] += ds^T k."""
    q_ref, do_ref, k_ref, v_ref, l_ref, dl_ref, qi_ref, ki_ref, *refs = refs
    qs_ref, ks_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
    lo_ref, full_ref = (refs.pop(0), refs.pop(0)) if causal else (None, None)
    if fused_dq:
        _, dk_ref, dv_ref, dq_ref = refs  # the input dq is the output's buffer
    else:
        dk_ref, dv_ref = refs
    k, v = k_ref[...], v_ref[...]
    k_pos = ki_ref[...]
    k_seg = None if ks_ref is None else ks_ref[...]
    nq = q_ref.shape[0] // ti

    def body(i, carry, gi, masked):
        dk, dv = carry
        sl = pl.ds(i * ti, ti)
        q, do = q_ref[sl, gi, :], do_ref[sl, gi, :]
        p = jnp.exp2(dot_t(k, q) * c - l_ref[gi, sl][None, :])  # p^T [tk, ti]
        mask = None  # transposed: keys along rows
        if masked:
            mask = k_pos[:, None] <= qi_ref[sl][None, :]
        if has_seg:
            same = k_seg[:, None] == qs_ref[sl][None, :]
            mask = same if mask is None else mask & same
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dv = dv + dot(p.astype(do.dtype), do)
        ds = (p * (dot_t(v, do) - dl_ref[gi, sl][None, :])).astype(q.dtype)
        if fused_dq:  # unscaled: backward multiplies dq by scale once
            plgpu.atomic_add(dq_ref, (sl, jnp.int32(gi), slice(None)), dot_tn(k, ds).T)
        return dk + dot(ds, q), dv

    if causal:
        t = pl.program_id(tile_axis)
        lo, full = lo_ref[t], full_ref[t]

    def head(gi, carry):
        if not causal:
            return jax.lax.fori_loop(0, nq, functools.partial(body, gi=gi, masked=False), carry)
        carry = jax.lax.fori_loop(lo, full, functools.partial(body, gi=gi, masked=True), carry)
        return jax.lax.fori_loop(full, nq, functools.partial(body, gi=gi, masked=False), carry)

    zeros = jnp.zeros(k.shape, F32)
    dk, dv = head(0, (zeros, zeros)) if g == 1 else jax.lax.fori_loop(0, g, head, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _dq_kernel(*refs, nq, ti, c, scale, causal, has_seg, tile_axis):
    """One (query tile, batch row, head). refs: q, do [tq, d]; k, v [sk, d]; L2, delta [tq]; q_idx [tq];
    k_idx [sk]; q_seg [tq]?, k_seg [sk]?; full, vis [nq]? -> dq [tq, d] f32."""
    q_ref, do_ref, k_ref, v_ref, l_ref, dl_ref, qi_ref, ki_ref, *refs = refs
    qs_ref, ks_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
    full_ref, vis_ref = (refs.pop(0), refs.pop(0)) if causal else (None, None)
    (dq_ref,) = refs
    q, do = q_ref[...], do_ref[...]
    lse2, delta = l_ref[...], dl_ref[...]
    q_pos = qi_ref[...]
    q_seg = None if qs_ref is None else qs_ref[...]

    def body(j, dq, masked):
        sl = pl.ds(j * ti, ti)
        k, v = k_ref[sl, :], v_ref[sl, :]
        p = jnp.exp2(dot_t(q, k) * c - lse2[:, None])
        mask = _mask(q_pos, ki_ref[sl] if masked else None, q_seg, None if ks_ref is None else ks_ref[sl], masked)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (dot_t(do, v) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = jnp.zeros(q.shape, F32)
    if causal:
        t = nq - 1 - pl.program_id(tile_axis)
        full, vis = full_ref[t], vis_ref[t]
        dq = jax.lax.fori_loop(0, full, functools.partial(body, masked=False), dq)
        dq = jax.lax.fori_loop(full, vis, functools.partial(body, masked=True), dq)
    else:
        dq = jax.lax.fori_loop(0, k_ref.shape[0] // ti, functools.partial(body, masked=False), dq)
    dq_ref[...] = dq * scale


def backward(q, k, v, do, lse, delta, q_idx, k_idx, q_seg=None, k_seg=None, *, causal: bool = True,
             scale: float | None = None, config: Config = Config(), interpret=None):
    """(dq, dk, dv), float32, of one block given the global ``lse`` and ``delta`` [b, sq, heads], as
    ``block_attention.backward``."""
    interpret = resolve_interpret(interpret)
    b, sq, h, d = q.shape
    sk, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    _check(sq, sk, config)
    scale = d ** -0.5 if scale is None else scale
    c = scale * LOG2E
    dp = max(16, pl.next_power_of_2(d))
    q, k, v, do = (_pad_dim(x, dp) for x in (q, k, v, do))
    # [b, sq, h] -> [b, h, sq]: contiguous rows per head. L2 = lse in log2 units (-inf rows: 0, as the reference).
    lse2 = jnp.swapaxes(jnp.where(lse == NEG_INF, 0.0, lse).astype(F32) * LOG2E, 1, 2)
    delta = jnp.swapaxes(delta.astype(F32), 1, 2)
    q_idx, k_idx = q_idx.astype(jnp.int32), k_idx.astype(jnp.int32)
    has_seg = q_seg is not None
    segs = [q_seg.astype(jnp.int32), k_seg.astype(jnp.int32)] if has_seg else []
    sqz = pl.squeezed

    # dk, dv: programs over key tiles of ``to`` rows, loops over query tiles of ``ti``.
    to, ti = _tile(sk, config.dkdv_block_k), _tile(sq, config.dkdv_block_q)
    nk = sk // to
    in_specs = [pl.BlockSpec((sqz, sq, g, dp), lambda j, bi, kh: (bi, 0, kh, 0))] * 2 + \
               [pl.BlockSpec((sqz, to, sqz, dp), lambda j, bi, kh: (bi, j, kh, 0))] * 2 + \
               [pl.BlockSpec((sqz, g, sq), lambda j, bi, kh: (bi, kh, 0))] * 2 + \
               [pl.BlockSpec((sq,), lambda j, bi, kh: (0,)), pl.BlockSpec((to,), lambda j, bi, kh: (j,))]
    args = [q, do, k, v, lse2, delta, q_idx, k_idx]
    if has_seg:
        in_specs += [pl.BlockSpec((sqz, sq), lambda j, bi, kh: (bi, 0)),
                     pl.BlockSpec((sqz, to), lambda j, bi, kh: (bi, j))]
        args += segs
    if causal:
        in_specs += [pl.BlockSpec((nk,), lambda j, bi, kh: (0,))] * 2
        args += list(_query_ranges(q_idx, k_idx, ti, to))
    kv_spec = pl.BlockSpec((sqz, to, sqz, dp), lambda j, bi, kh: (bi, j, kh, 0))
    out_specs, out_shape, aliases = [kv_spec, kv_spec], [jax.ShapeDtypeStruct((b, sk, kvh, dp), F32)] * 2, {}
    if config.fused_dq:  # every key tile's program adds into the dq rows of its batch row and heads
        q_spec = pl.BlockSpec((sqz, sq, g, dp), lambda j, bi, kh: (bi, 0, kh, 0))
        in_specs.append(q_spec)
        args.append(jnp.zeros((b, sq, h, dp), F32))
        out_specs.append(q_spec)
        out_shape.append(jax.ShapeDtypeStruct((b, sq, h, dp), F32))
        aliases = {len(args) - 1: 2}
    grid, tile_axis, wrap = _programs(nk, b, kvh, config.group)
    outs = pl.pallas_call(
        functools.partial(_dkdv_kernel, g=g, ti=ti, c=c, scale=scale, causal=causal, has_seg=has_seg,
                          fused_dq=bool(config.fused_dq), tile_axis=tile_axis),
        grid=grid, in_specs=_wrap_specs(in_specs, wrap), out_specs=_wrap_specs(out_specs, wrap), out_shape=out_shape,
        input_output_aliases=aliases, interpret=interpret,
        compiler_params=compiler_params(interpret, config.dkdv_num_warps, config.dkdv_num_stages),
        name="flash_attention_dkdv")(*args)
    if config.fused_dq:
        dk, dv, dq = outs
        return dq[..., :d] * scale, dk[..., :d], dv[..., :d]
    dk, dv = outs

    # dq: programs over query tiles of ``to`` rows (heaviest first), loops over key tiles of ``ti``.
    to, ti = _tile(sq, config.dq_block_q), _tile(sk, config.dq_block_k)
    nq = sq // to
    rev = lambda i: nq - 1 - i  # noqa: E731
    in_specs = [pl.BlockSpec((sqz, to, sqz, dp), lambda i, bi, hi: (bi, rev(i), hi, 0))] * 2 + \
               [pl.BlockSpec((sqz, sk, sqz, dp), lambda i, bi, hi: (bi, 0, hi // g, 0))] * 2 + \
               [pl.BlockSpec((sqz, sqz, to), lambda i, bi, hi: (bi, hi, rev(i)))] * 2 + \
               [pl.BlockSpec((to,), lambda i, bi, hi: (rev(i),)), pl.BlockSpec((sk,), lambda i, bi, hi: (0,))]
    args = [q, do, k, v, lse2, delta, q_idx, k_idx]
    if has_seg:
        in_specs += [pl.BlockSpec((sqz, to), lambda i, bi, hi: (bi, rev(i))),
                     pl.BlockSpec((sqz, sk), lambda i, bi, hi: (bi, 0))]
        args += segs
    if causal:
        in_specs += [pl.BlockSpec((nq,), lambda i, bi, hi: (0,))] * 2
        args += list(_key_ranges(q_idx, k_idx, to, ti))
    grid, tile_axis, wrap = _programs(nq, b, h, config.group)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, nq=nq, ti=ti, c=c, scale=scale, causal=causal, has_seg=has_seg,
                          tile_axis=tile_axis),
        grid=grid, in_specs=_wrap_specs(in_specs, wrap),
        out_specs=_wrap_specs([pl.BlockSpec((sqz, to, sqz, dp), lambda i, bi, hi: (bi, rev(i), hi, 0))], wrap)[0],
        out_shape=jax.ShapeDtypeStruct((b, sq, h, dp), F32),
        interpret=interpret, compiler_params=compiler_params(interpret, config.dq_num_warps, config.dq_num_stages),
        name="flash_attention_dq")(*args)
    return dq[..., :d], dk[..., :d], dv[..., :d]
