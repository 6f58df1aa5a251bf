"""Attention of a few new tokens over the KV cache as one Pallas (Triton) kernel (plus a combine for split-K).

The cached decoding step of ``models/attention.py`` (same arguments, same result as ``reference``):
for query row i at cache index p_i = q_start + i and the cache slots j,

    s_ij = q_i . k_j / sqrt(d)   where j <= p_i and kv_seg_j == q_seg_i (else masked)
    o_i  = sum_j softmax_j(s_ij) v_j                    (float32 softmax, o in q's dtype)

Grouped-query attention (Ainslie et al. 2023): one program takes all g = heads / kv_heads query heads
of one kv head (and all q_len tokens), so each key and value is read once, as the rows of one
[g q_len, d] query tile (padded to a power of two of at least 16 rows: Triton's smallest dot).
Split-K, the flash-decoding way (Dao et al. 2023, "Flash-Decoding for long-context inference"):
when batch x kv_heads programs cannot fill the GPU, the visible key tiles of each (batch row, kv
head) are cut into ``splits`` contiguous ranges, one program each; each writes its running max m,
denominator l and unnormalised output acc (float32), and a second kernel combines them:

    M = max_s m_s    o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s   (m in log2 units)

Only key tiles that hold a slot <= q_start + q_len - 1 are visited (the cache is allocated at its
full length and filled from the front); the rest are never read. The split into ranges is made at
run time from q_start: the visible tiles are spread evenly over the splits (while fewer tiles than
splits are visible, some splits get none and the combine gives them weight 0).

The cache may be passed stacked over layers, k, v [layers, b, max_len, kv_heads, d] with the layer
index a runtime operand (``layer``): the kernel reads that layer where it lies, nothing is sliced
or copied before the call (a dynamic slice of the cache before a custom call would copy it).

Shapes: q [b, q_len, heads, d]; k, v [b, max_len, kv_heads, d] or [layers, b, max_len, kv_heads, d],
any dtype (cast to q's in the kernel, as the XLA path casts the cache); q_seg [b, q_len] and kv_seg
[b, max_len] int32, or both None (no segment mask). A row that sees no key gets 0 (``reference``
would average every slot; decoding never asks for it: a token always sees its own slot). On a GPU
head_dim must be a power of two from 16 to 256 (``supports``). ``interpret=True`` (the default off
GPU) runs the same kernels in the Pallas interpreter (tests on CPU). Under an active mesh
(``parallel.sharding.activate``) the kernels run in ``shard_map``, each device on its rows (``batch``)
and heads (``heads`` and ``kv_heads``, which must map to the same mesh axes) of the cache, whose
``layers`` axis is whole on every device.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from models.flash_kernel import F32, LOG2E, NEG_INF, dot, dot_t, resolve_interpret, compiler_params, is_pow2, sm_count
from parallel import sharding



class Config(NamedTuple):
    """Tile size and launch parameters (hashable: a static argument)."""
    block_k: int = 64     # cache slots per loop step (a power of two of at least 16)
    splits: int = 0       # key ranges per (batch row, kv head); 0: ``auto_splits``
    max_splits: int = 16
    num_warps: int = 4
    num_stages: int = 2
    combine_num_warps: int = 4


def supports(head_dim: int) -> bool:
    """Whether the Triton kernel takes this head_dim (a power of two from 16 to 256: Triton's tiles)."""
    return is_pow2(head_dim) and 16 <= head_dim <= 256


def auto_splits(batch: int, kv_heads: int, max_len: int, config: Config = Config()) -> int:
    """The largest power of two S <= max_splits (and <= the number of key tiles) with batch x kv_heads x S
    programs still within one wave of the GPU's SMs; 1 when batch x kv_heads fills the GPU already."""
    tiles = -(-max_len // config.block_k)
    s, sms = 1, sm_count()
    while s * 2 <= min(config.max_splits, tiles) and batch * kv_heads * s * 2 <= sms:
        s *= 2
    return s


def _kernel(*refs, g: int, sq: int, tk: int, max_len: int, splits: int, c: float, has_seg: bool):
    """One (batch row, kv head, split). refs: q_start [1], layer [1]; whole arrays: q [b, kv_heads, g sq, d]
    (rows token-major, then the g heads of the group; read as Rp rows, those past g sq masked); k, v [layers,
    b, max_len, kv_heads, d]; q_seg [b, sq]?, kv_seg [b, max_len]? -> with one split o [b, kv_heads, g sq, d],
    else acc [b, kv_heads, splits, g sq, d], m, l [b, kv_heads, splits, g sq] float32 (this program's rows)."""
    qs_ref, layer_ref, q_ref, k_ref, v_ref, *refs = refs
    qseg_ref, kseg_ref = (refs.pop(0), refs.pop(0)) if has_seg else (None, None)
    bi, hi, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q_start, layer = qs_ref[0], layer_ref[0]
    rp = pl.next_power_of_2(max(16, g * sq))
    q = _load_rows(q_ref, (bi, hi), g * sq, rp)
    rows = jax.lax.broadcasted_iota(jnp.int32, (rp,), 0)
    token = rows // g
    q_pos = jnp.where(rows < sq * g, q_start + token, -1)  # padding rows see nothing
    if has_seg:
        q_seg = jnp.zeros((rp,), jnp.int32)
        for i in range(sq):
            q_seg = jnp.where(token == i, qseg_ref[bi, i], q_seg)
    n_vis = jnp.minimum((q_start + sq - 1) // tk + 1, -(-max_len // tk))  # tiles holding a visible slot
    lo, hi_t = si * n_vis // splits, (si + 1) * n_vis // splits  # the visible tiles, evenly over the splits
    ragged = max_len % tk != 0

    def body(j, carry):
        m, l, acc = carry
        start = j * tk
        k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (tk,), 0)
        sl = pl.ds(pl.multiple_of(start, tk), tk)
        at_k, at_v = k_ref.at[layer, bi, sl, hi, :], v_ref.at[layer, bi, sl, hi, :]
        if ragged:  # the last tile runs past the cache: masked loads
            inside = k_pos < max_len
            k = plgpu.load(at_k, mask=inside[:, None], other=0)
            v = plgpu.load(at_v, mask=inside[:, None], other=0)
        else:
            k, v = at_k[...], at_v[...]
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = dot_t(q, k)  # [Rp, tk]
        mask = k_pos[None, :] <= q_pos[:, None]
        if has_seg:
            at_s = kseg_ref.at[bi, sl]
            k_seg = plgpu.load(at_s, mask=inside, other=0) if ragged else at_s[...]
            mask = mask & (k_seg[None, :] == q_seg[:, None])
        s = jnp.where(mask, s * c, NEG_INF)  # log2 units
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
        p = jnp.exp2(s - m_safe[:, None])
        alpha = jnp.exp2(m - m_safe)
        acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    d = q.shape[1]
    init = (jnp.full((rp,), NEG_INF, F32), jnp.zeros((rp,), F32), jnp.zeros((rp, d), F32))
    m, l, acc = jax.lax.fori_loop(lo, hi_t, body, init)
    if splits == 1:
        (o_ref,) = refs
        o = acc / jnp.where(l == 0.0, 1.0, l)[:, None]
        _store_rows(o_ref, (bi, hi), o, g * sq)
    else:
        acc_ref, m_ref, l_ref = refs
        for ref, x in ((acc_ref, acc), (m_ref, m), (l_ref, l)):
            _store_rows(ref, (bi, hi, si), x, g * sq)


def _rows_view(ref, index, rp: int, axis: int):
    """(ref.at[index] with its row axis, ``axis`` of the remaining ones, cut to rows [0, rp), that view's shape)."""
    shape = list(ref.shape[len(index):])
    sl = [slice(None)] * len(shape)
    sl[axis], shape[axis] = pl.ds(0, rp), rp
    return ref.at[(*index, *sl)], tuple(shape)


def _load_rows(ref, index, r: int, rp: int, axis: int = 0):
    """The r rows of ref.at[index] (on ``axis``) as rp rows, those past r zero (masked: never read)."""
    view, shape = _rows_view(ref, index, rp, axis)
    if r == rp:
        return view[...]
    return plgpu.load(view, mask=jax.lax.broadcasted_iota(jnp.int32, shape, axis) < r, other=0)


def _store_rows(ref, index, x, r: int, axis: int = 0):
    """Store the first r rows (on ``axis``) of x at ref.at[index] (whose row axis is r long): masked past r."""
    view, _ = _rows_view(ref, index, x.shape[axis], axis)
    x = x.astype(ref.dtype)
    if r == x.shape[axis]:
        view[...] = x
    else:
        plgpu.store(view, x, mask=jax.lax.broadcasted_iota(jnp.int32, x.shape, axis) < r)


def _combine_kernel(acc_ref, m_ref, l_ref, o_ref, *, r: int, rp: int):
    """One (batch row, kv head): acc [S, r, d], m, l [S, r] float32 (whole arrays) -> o [r, d] (stored in the
    whole o)."""
    index = (pl.program_id(0), pl.program_id(1))
    m = _load_rows(m_ref, index, r, rp, axis=1)
    big = jnp.max(m, axis=0)
    big = jnp.where(big == NEG_INF, 0.0, big)
    w = jnp.exp2(m - big[None, :])  # [S, Rp]; an empty split (m = -inf) weighs 0
    l = jnp.sum(w * _load_rows(l_ref, index, r, rp, axis=1), axis=0)
    o = jnp.sum(w[:, :, None] * _load_rows(acc_ref, index, r, rp, axis=1), axis=0)
    _store_rows(o_ref, index, o / jnp.where(l == 0.0, 1.0, l)[:, None], r)


@functools.lru_cache(maxsize=None)
def _calls(b: int, kvh: int, g: int, sq: int, max_len: int, d: int, has_seg: bool, splits: int, config: Config,
           dtype, interpret: bool):
    r = g * sq
    rp = max(16, pl.next_power_of_2(r))
    tk = config.block_k
    scalar = pl.BlockSpec((1,), lambda bi, hi, si: (0,))
    in_specs = [scalar, scalar] + [pl.BlockSpec()] * (3 + 2 * has_seg)  # whole arrays: the kernel indexes them
    out = jax.ShapeDtypeStruct((b, kvh, r, d), dtype)
    kernel = functools.partial(_kernel, g=g, sq=sq, tk=tk, max_len=max_len, splits=splits, c=d ** -0.5 * LOG2E,
                               has_seg=has_seg)
    params = compiler_params(interpret, config.num_warps, config.num_stages)
    if splits == 1:
        return pl.pallas_call(kernel, grid=(b, kvh, 1), in_specs=in_specs, out_specs=pl.BlockSpec(), out_shape=out,
                              interpret=interpret, compiler_params=params, name="decode_attention"), None
    main = pl.pallas_call(
        kernel, grid=(b, kvh, splits), in_specs=in_specs, out_specs=[pl.BlockSpec()] * 3,
        out_shape=[jax.ShapeDtypeStruct((b, kvh, splits, r, d), F32)]
        + [jax.ShapeDtypeStruct((b, kvh, splits, r), F32)] * 2,
        interpret=interpret, compiler_params=params, name="decode_attention_split")
    combine = pl.pallas_call(
        functools.partial(_combine_kernel, r=r, rp=rp), grid=(b, kvh), in_specs=[pl.BlockSpec()] * 3,
        out_specs=pl.BlockSpec(), out_shape=out, interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=config.combine_num_warps),
        name="decode_attention_combine")
    return main, combine


def layout_problem(batch: int, heads: int, kv_heads: int) -> str | None:
    """Why ``decode_attention`` cannot run under the active layout, or None (always None without one): it needs
    ``heads`` and ``kv_heads`` on the same mesh axes (each device holds whole groups), and the rows and both head
    counts divisible by the devices they are split over."""
    active = sharding.active()
    if active is None:
        return None
    spec = lambda name: sharding.logical_to_spec((name,), active[1])[0]  # noqa: E731
    if spec("heads") != spec("kv_heads"):
        return (f"the rules shard heads as {spec('heads')} and kv_heads as {spec('kv_heads')}; the decode kernel "
                "needs both on the same mesh axes (each device holds whole groups).")
    heads_n, rows_n = sharding.logical_size("heads"), sharding.logical_size("batch")
    if heads % heads_n or kv_heads % heads_n or batch % rows_n:
        return (f"{batch} rows, {heads} heads and {kv_heads} kv_heads do not divide over the {rows_n} x {heads_n} "
                "devices the rules split them over, as the decode kernel needs.")
    return None


def decode_attention(q, k, v, q_start, q_seg=None, kv_seg=None, *, layer=None, config: Config = Config(),
                     interpret=None):
    """softmax(q k^T / sqrt(d) + mask) v over the cache: [b, q_len, heads, d] in q's dtype (module docstring).

    q_start: the cache index of the first query (an int or int32 scalar, traced or not); ``layer``:
    k, v are stacked [layers, b, max_len, kv_heads, d] and this layer (int or int32 scalar) is read.
    """
    active = sharding.active()
    if active is None:
        return _decode_attention(q, k, v, q_start, q_seg, kv_seg, layer=layer, config=config, interpret=interpret)
    problem = layout_problem(q.shape[0], q.shape[2], k.shape[-2])
    if problem:
        raise ValueError(problem)
    stacked = layer is not None
    rows, q_names = ("batch", None), ("batch", None, "heads", None)
    kv_names = (None,) * stacked + ("batch", None, "kv_heads", None)
    segs = () if q_seg is None else (q_seg, kv_seg)
    scalars = (jnp.asarray(q_start, jnp.int32), jnp.asarray(0 if layer is None else layer, jnp.int32))

    def run(q, k, v, q_start, layer_index, *segs):
        return _decode_attention(q, k, v, q_start, *(segs or (None, None)), layer=layer_index if stacked else None,
                                 config=config, interpret=interpret)

    in_names = (q_names, kv_names, kv_names, (), (), *(rows,) * len(segs))
    return sharding.per_device(run, in_names, q_names)(q, k, v, *scalars, *segs)


def _decode_attention(q, k, v, q_start, q_seg, kv_seg, *, layer, config: Config, interpret):
    """``decode_attention`` on one device's arrays."""
    interpret = resolve_interpret(interpret)
    b, sq, h, d = q.shape
    if layer is None:
        k, v, layer = k[None], v[None], 0
    if k.ndim != 5 or k.shape[1] != b or k.shape[-1] != d or v.shape != k.shape:
        raise ValueError(f"k, v are {k.shape}, {v.shape}; they must be [(layers,) batch={b}, max_len, kv_heads, "
                         f"head_dim={d}], both the same shape.")
    max_len, kvh = k.shape[2], k.shape[3]
    if h % kvh:
        raise ValueError(f"heads={h} is not a multiple of kv_heads={kvh}.")
    if (q_seg is None) != (kv_seg is None):
        raise ValueError("q_seg and kv_seg must both be given or both be None.")
    tk = config.block_k
    if not (is_pow2(tk) and tk >= 16):
        raise ValueError(f"Config.block_k is {tk}; it must be a power of two of at least 16.")
    if not interpret and not supports(d):
        raise ValueError(f"head_dim is {d}; the Triton decode-attention kernel takes a power of two from 16 to 256.")
    g = h // kvh
    splits = config.splits or auto_splits(b, kvh, max_len, config)
    if not is_pow2(splits):
        raise ValueError(f"Config.splits is {splits}; it must be a power of two (or 0: automatic).")
    has_seg = q_seg is not None
    main, combine = _calls(b, kvh, g, sq, max_len, d, has_seg, splits, config, jnp.dtype(q.dtype), bool(interpret))
    # the rows of one kv head: (token, head of its group); a reshape alone when q_len = 1
    qr = q.reshape(b, sq, kvh, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kvh, g * sq, d)
    args = [jnp.reshape(jnp.asarray(q_start, jnp.int32), (1,)), jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
            qr, k, v]
    if has_seg:
        args += [q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)]
    o = main(*args) if combine is None else combine(*main(*args))
    return o.reshape(b, kvh, sq, g, d).transpose(0, 2, 1, 3, 4).reshape(b, sq, h, d)
