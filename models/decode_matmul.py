"""A batch-1 decoding step's projections as Pallas (Triton) kernels: y = x @ W for one row x [K] and W [K, N]
in bf16 or fp16, float32 accumulation, W read once.

XLA multiplies one row either as a broadcast multiply and reduce (its dot strength reduction, which
writes and re-reads a product the size of W) or, in ``layers``, as a two-row GEMM with a zero row (a
padding kernel, and a GEMM that computes two rows). Here each program owns block_n outputs and streams
their weights over K in tiles (Triton pipelines the loads). W comes in one of two layouts:

    [K, N] (as the model stores it): [block_k, block_n] tiles through the tensor cores, x broadcast to the
           16 rows a product takes (the copies are equal; the kernel keeps one). Taken by ``layers.linear``
           for wide outputs (N >= ``MIN_N``).
    out-major, W^T [N, K] (``out_major``; ``weights.OutMajor``): each output's weights are one contiguous
           row, so a program may own as few as 2 outputs and the GPU still fills with programs; each lane
           multiplies and adds elementwise ([block_n, block_k] partial sums, reduced once at the end).

Out-major, the product can take a Transformer layer's neighbours with it, so that a batch-1 step runs
a layer as six kernels instead of seventeen (``models.transformer``, ``model.decode``):

    norm:      y = rms(x)^-1 ((x * scale) @ W)        RMSNorm (Zhang & Sennrich 2019) before the product; the sum
                                                      of squares accumulates in the same loop over K tiles
    glu:       y = silu(x @ W_gate) * (x @ W_up)      SwiGLU (Shazeer 2020), W = [W_gate | W_up] [K, 2F] -> [F]
    residual:  y = r + x @ W                          the residual stream's add after W_o and W_down

``decode_qkv`` is W_qkv's product with the norm, the rotary embedding of q and k, and the write of k and
v into the (stacked) KV cache in place.

Out-major weights may also be int4 (``awq.Int4.to_out_major``: uint32 words [N, K/8], scale and zero [N,
K/group], W = (q - z) s per group): the words are read as [N, K/group, 16] (group 128), so a loop step loads
[block_n, G, 16] words, takes nibble j apart with a shift and a mask (``int4_kernel.magic_levels``) against
x's inputs 8i + j (stride-8 loads of x viewed as [K/group, group]) and adds s (x . q - z sum x) per group and
lane. Every form above takes them. The plain and residual products may also split K across programs
(``splits``; the float32 partials summed by XLA), as int4's plan does: one K tile a program. Each result is
rounded to the compute dtype where XLA's unfused ops round it (the product, silu, the gate, the rotation), so the
two paths differ only in the order of float32 sums and in the norm's scale, which is applied to the float32
product instead of to x.

On an H200, the 1.26B config's batch-1 step: 2.5-4.5% faster with W_qkv, W_gate_up and the LM head through
the [K, N] kernel than with the two-row GEMM; 1.27-1.29x faster again with the six-kernel layer; on int4 weights,
the six-kernel layer 1.18-1.19x bf16's (``experiments/BENCHMARKS.md``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from models.flash_kernel import F32, block_size, compiler_params, is_pow2, resolve_interpret, sm_count
from models.int4_kernel import ONE_BITS, magic_levels

MIN_N = 3072  # the [K, N] kernel fills the GPU only this wide without a K split (the split form is not used)
DTYPES = (jnp.bfloat16, jnp.float16)


def plan(m: int, k: int, n: int, dtype, *, out_major: bool = False, glu: bool = False, group: int = 0) -> dict | None:
    """Tiles for x [m, k] @ W [k, n] of ``dtype``, or None when no kernel takes the shape: m != 1, not bf16/fp16,
    K not a multiple of 256, or N not a multiple of block_n (with ``glu``, each half).

    [K, N] (the plain product only, N >= ``MIN_N``): block_n 64 while that gives at least two thirds of the SMs a
    program, else 32; block_k 256 (at the 1.26B config's W_qkv [2048, 6144] and W_gate_up [2048, 11264] on an
    H200: within 2% of the best of a sweep over block_n 16-64, block_k 256-512 and K splits 1-8).
    ``out_major``: block_n 2, block_k 512 where it divides K, else 256 (with ``glu``: block_n 16, both halves'
    outputs counted, and block_k 256): the fastest of a sweep on an H200 over block_n 2-32, block_k 256-512 and
    2-3 stages at the 1.26B config's shapes, device-timed (W_o 4.6 us against XLA's 8.2, W_down 8.6 against 11.7,
    W_gate_up with its norm and SwiGLU 13.9 against 17.6).
    ``group`` (out-major int4 weights in groups of that many inputs, a power of two >= 16 dividing K): block_k the
    largest power of two up to 1024 dividing K. With glu: block_n 16, 4 warps (W_gate_up with its norm and SwiGLU
    9.5 us against the bf16 kernel's 14.8 at the 1.26B config on an H200). Else each program multiplies one K tile
    (splits = K / block_k, the partials summed by XLA): block_n 8, a warp per 2048 of the tile's inputs (8 words a
    thread). On an H200, device-timed with the residual and the sum: W_down 6.1 us against 10.0 unsplit, W_o
    3.2 against 3.7; the best of 24 settings of block_n 2-32, block_k 128-2048, splits 1-44 and 2-8 warps."""
    if m != 1 or jnp.dtype(dtype) not in DTYPES or k % 256:
        return None
    if group:
        if not out_major or not is_pow2(group) or group < 16 or k % group:
            return None
        if glu:
            block_k = max(group, block_size(k, 1024))
            return None if n % 16 else dict(block_n=16, block_k=block_k, num_warps=4, num_stages=3)
        block_k, block_n = max(group, block_size(k, 1024)), 8 if n % 8 == 0 else 2
        return None if n % block_n else dict(block_n=block_n, block_k=block_k, splits=k // block_k,
                                             num_warps=max(1, block_n * block_k // 2048), num_stages=3)
    if out_major:
        block_n = 16 if glu else 2
        if n % block_n:
            return None
        return dict(block_n=block_n, block_k=512 if k % 512 == 0 and not glu else 256, num_warps=4, num_stages=3)
    if glu or n < MIN_N:
        return None
    block_n = 64 if n // 64 >= 2 * sm_count() // 3 else 32
    return None if n % block_n else dict(block_n=block_n, block_k=256, num_warps=4, num_stages=3)


def _check_tiles(tiles: dict, k: int, outputs: int, what: str, group: int = 0) -> None:
    """ValueError unless block_n and block_k are powers of two (Triton's blocks) dividing ``outputs`` and K, and
    block_k a multiple of the int4 ``group``."""
    for name, size in (("block_n", outputs), ("block_k", k)):
        value = tiles[name]
        if isinstance(value, bool) or not isinstance(value, int) or not is_pow2(value) or size % value:
            raise ValueError(f"{what}'s {name} is {value!r}; it must be a power of two dividing {size}.")
    if group and tiles["block_k"] % group:
        raise ValueError(f"{what}'s block_k is {tiles['block_k']}; with int4 weights it must be a multiple of their "
                         f"group ({group}).")


def _kernel(*refs, block_k: int, steps: int, norm: bool, glu: bool, residual: bool, eps: float, out_major: bool,
            group: int, blocks: int):
    """One program's outputs: the product of x and their weights accumulated over the K tiles (``_accumulate``),
    then the epilogue. refs: one [1] (1.0's bits, int4 only), x [1, K], scale [1, K]?, W's slice [K, bn] or
    ``out_major`` [bn, K] (glu: W_gate's and W_up's), r [1, bn]? -> o [1, bn]. int4 (``group``): x and scale
    [K/group, group], and each weight's (packed [bn, K/group, group/8], scale, zero [bn, K/group])."""
    refs = list(refs)
    one = refs.pop(0)[0] if group else None
    x_ref = refs.pop(0)
    s_ref = refs.pop(0) if norm else None
    w_refs = [tuple(refs.pop(0) for _ in range(3 if group else 1)) for _ in range(1 + glu)]
    r_ref = refs.pop(0) if residual else None
    (o_ref,) = refs
    rows = slice(None)  # the BlockSpecs gave each program its own rows
    base = (pl.program_id(0) // blocks) * (steps * block_k)  # this program's part of K (the first, unless split)

    def body(i, carry):
        accs, ss = carry
        k0 = pl.multiple_of(base + i * block_k, block_k)
        xt, ss = _x_tile(x_ref, s_ref, k0, block_k, ss, group)
        return tuple(_accumulate(a, xt, w, rows, k0, out_major, group, one) for a, w in zip(accs, w_refs)), ss

    init = tuple(_zeros(o_ref.shape[-1], block_k, out_major, group) for _ in w_refs), _ss_zeros(block_k, group)
    accs, ss = jax.lax.fori_loop(0, steps, body, init)
    ys = [_value(a, out_major) for a in accs]
    if norm:
        ys = [y * _inv_rms(ss, steps * block_k, eps) for y in ys]
    o_ref[...] = _epilogue(ys, r_ref[...] if residual else None, o_ref.dtype, x_ref.dtype)


def _x_tile(x_ref, s_ref, k0, block_k: int, ss, group: int):
    """x's inputs k0 .. k0 + block_k, times the norm's scale when there is one (``s_ref``, rounded to x's dtype as
    XLA's norm rounds), and ``ss`` plus their float32 squares (summed once, after the loop). Dense weights: one
    [1, block_k] tile in x's dtype (ss [1, block_k]). int4 (``group``; x_ref [K/group, group]): the tile's G groups
    as eight float32 slices [G, group/8] (slice j holds inputs 8i + j of each group: nibble j of word i) and their
    sum (ss [G, group/8])."""
    if not group:
        return _scaled(x_ref, s_ref, (slice(None), pl.ds(k0, block_k)), ss)
    rows = pl.ds(pl.multiple_of(k0 // group, block_k // group), block_k // group)
    slices = []
    for j in range(8):
        xj, ss = _scaled(x_ref, s_ref, (rows, pl.ds(j, group // 8, stride=8)), ss)
        slices.append(xj.astype(F32))
    return (slices, sum(slices[1:], slices[0])), ss


def _scaled(x_ref, s_ref, at, ss):
    """x_ref[at], times s_ref[at] in float32 rounded to x's dtype when there is a norm, and ss + its squares."""
    xk = x_ref[at]
    if s_ref is None:
        return xk, ss
    x32 = xk.astype(F32)
    return (x32 * s_ref[at].astype(F32)).astype(xk.dtype), ss + x32 * x32


def _inv_rms(ss, k: int, eps: float):
    """1 / sqrt(mean(x^2) + eps) [1, 1] from the per-lane sums of squares ss [rows, lanes] over K = ``k`` elements."""
    total = jnp.sum(jnp.sum(ss, axis=1, keepdims=True), axis=0, keepdims=True)
    return jax.lax.rsqrt(total / k + eps)


def _ss_zeros(block_k: int, group: int):
    """The norm's per-lane sums of squares: [1, block_k], int4 [block_k/group, group/8] (``_x_tile``)."""
    return jnp.zeros((block_k // group, group // 8) if group else (1, block_k), F32)


def _zeros(bn: int, block_k: int, out_major: bool, group: int = 0):
    """The accumulator: out-major [bn, block_k] lanes (int4: [bn, block_k/group, group/8], a lane per word), else
    [16, bn]."""
    if group:
        return jnp.zeros((bn, block_k // group, group // 8), F32)
    return jnp.zeros((bn, block_k) if out_major else (16, bn), F32)


def _accumulate(acc, xt, w, rows, k0, out_major: bool, group: int, one):
    """acc + the tile xt (``_x_tile``) times the rows ``rows`` of ``w``'s K tile at k0. Dense out-major (w: (W^T,)):
    elementwise, acc [bn, block_k] of per-lane partial sums; [K, N]: on the tensor cores (acc [16, bn], x broadcast
    to 16 equal rows). int4 (w: packed [N, K/group, group/8], scale, zero [N, K/group]): per group g, s_g (x_g . q_g
    - z_g sum x_g) per word lane (acc [bn, G, group/8]), the levels by ``int4_kernel.magic_levels`` (x . q =
    16 (x . v - sum x))."""
    if group:
        p_ref, s_ref, z_ref = w
        slices, xsum = xt
        g = pl.ds(pl.multiple_of(k0 // group, acc.shape[1]), acc.shape[1])
        words = p_ref[rows, g, :]  # [bn, G, group/8]
        prod = None
        for j, xj in enumerate(slices):
            v = magic_levels(words, j, one)
            prod = xj[None] * v if prod is None else xj[None] * v + prod
        scale = s_ref[rows, g].astype(F32)[:, :, None]
        zero = z_ref[rows, g].astype(F32)[:, :, None] + 16.0
        return acc + scale * (16.0 * prod - zero * xsum[None])
    (w_ref,) = w
    if out_major:
        return acc + w_ref[rows, pl.ds(k0, xt.shape[-1])].astype(F32) * xt.astype(F32)
    tile = w_ref[pl.ds(k0, xt.shape[-1]), :]
    return acc + jnp.dot(jnp.broadcast_to(xt, (16, xt.shape[-1])), tile, preferred_element_type=F32)


def _value(acc, out_major: bool):
    """The accumulated product [1, bn]: the lanes summed (out-major; int4: both lane axes), or one of the 16 equal
    rows."""
    if acc.ndim == 3:
        acc = jnp.sum(acc, axis=2)
    return jnp.sum(acc, axis=1)[None, :] if out_major else jnp.max(acc, axis=0, keepdims=True)


def _round(x, dtype):
    return x.astype(dtype).astype(F32)


def _epilogue(ys, r, out_dtype, dtype):
    """The float32 product(s) -> the output: silu(gate) * up with ``glu`` (two products), r + y with a residual,
    each step rounded to ``dtype`` as XLA's ops round it."""
    if len(ys) == 2:
        gate, up = (_round(y, dtype) for y in ys)
        y = _round(gate * _round(1.0 / (1.0 + jnp.exp(-gate)), dtype), dtype) * up
    else:
        (y,) = ys
    if r is not None:
        y = r.astype(F32) + _round(y, dtype)
    return y.astype(out_dtype)


def _dims(w, out_major: bool) -> tuple[int, int, int]:
    """(N, K, group) of w: W [K, N] or W^T [N, K] (group 0), or int4 (packed [N, K/8], scale, zero [N, K/group])."""
    if isinstance(w, tuple):
        packed, scale = w[0], w[1]
        k = 8 * packed.shape[-1]
        return packed.shape[0], k, k // max(scale.shape[-1], 1)
    n, k = w.shape if out_major else w.shape[::-1]
    return n, k, 0


def _describe(w) -> tuple:
    """w's shape and dtype (int4: each part's), for an error message."""
    return tuple(_describe(a) for a in w) if isinstance(w, tuple) else (w.shape, str(w.dtype))


def _int4_parts_fit(w, n: int, k: int, group: int) -> bool:
    """Whether the int4 parts are uint32 words [N, K/8] with float scale and zero [N, K/group] of one shape."""
    packed, scale, zero = w
    return (packed.ndim == 2 and packed.dtype == jnp.uint32 and scale.shape == zero.shape == (n, k // group)
            and k % group == 0 and all(jnp.issubdtype(a.dtype, jnp.floating) for a in (scale, zero)))


def _product(x, w, out_dtype, tiles: dict, interpret: bool, scale, eps, glu, residual, out_major):
    """One row x times w -> [splits, N] (glu: N / 2): each of the K splits' float32 partial products, or with one
    split the output. A program per (split, block_n outputs), grid index p = split * blocks + block."""
    n, k, group = _dims(w, out_major)
    cols = n // 2 if glu else n
    bn = tiles["block_n"] // 2 if glu else tiles["block_n"]
    splits, nb = tiles.get("splits", 1), cols // bn
    row = pl.BlockSpec((1, k), lambda p: (0, 0))
    if group:  # x and the norm's scale as [K/group, group]; each half's words [N, K/group, group/8], scales, zeros
        row = pl.BlockSpec((k // group, group), lambda p: (0, 0))
        parts = _int4_operands(w, group)
        slices = [pl.BlockSpec((bn, *part.shape[1:]),
                               lambda p, h=h, d=part.ndim: (p % nb + h * nb,) + (0,) * (d - 1))
                  for h in range(1 + glu) for part in parts]
        weights = list(parts) * (1 + glu)
    elif out_major:
        slices = [pl.BlockSpec((bn, k), lambda p, h=h: (p % nb + h * nb, 0)) for h in range(1 + glu)]
        weights = [w] * (1 + glu)
    else:
        slices, weights = [pl.BlockSpec((k, bn), lambda p: (0, p % nb))], [w]
    ones = [pl.BlockSpec((1,), lambda p: (0,))] if group else []
    out = pl.BlockSpec((1, bn), lambda p: (p // nb, p % nb))
    in_specs = ones + [row] * (1 + (scale is not None)) + slices + [out] * (residual is not None)
    norm_scale = [] if scale is None else [scale.reshape(row.block_shape)]
    args = [*([_one_bits()] if group else []), x.reshape(row.block_shape), *norm_scale, *weights,
            *([] if residual is None else [residual])]
    form = "".join(f"_{name}" for name, on in (("norm", scale is not None), ("glu", glu),
                                                ("residual", residual is not None), ("t", out_major),
                                                (f"int4g{group}", group)) if on)
    return pl.pallas_call(
        functools.partial(_kernel, block_k=tiles["block_k"], steps=k // tiles["block_k"] // splits,
                          norm=scale is not None, glu=glu, residual=residual is not None, eps=eps, out_major=out_major,
                          group=group, blocks=nb),
        out_shape=jax.ShapeDtypeStruct((splits, cols), out_dtype), grid=(splits * nb,),
        in_specs=in_specs, out_specs=out,
        interpret=interpret, compiler_params=compiler_params(interpret, tiles["num_warps"], tiles["num_stages"]),
        name=f"decode_matmul{form}_{k}x{n}")(*args)


def _int4_operands(w, group: int):
    """The int4 parts as the kernels read them: packed [N, K/8] -> [N, K/group, group/8] (free), scale, zero."""
    packed, scale, zero = w
    return packed.reshape(packed.shape[0], scale.shape[1], group // 8), scale, zero


def _one_bits():
    """float32 1.0's bits [1] uint32, an operand of the int4 kernels (``int4_kernel.magic_levels``)."""
    return jnp.asarray([ONE_BITS[jnp.dtype(F32)]], jnp.uint32)


def takes(x: jax.Array, w, *, out_major: bool = False, glu: bool = False) -> bool:
    """Whether ``decode_matmul`` multiplies x [..., K] by w: [K, N] or ``out_major`` [N, K] of x's dtype, or
    ``out_major`` int4 parts (packed uint32 [N, K/8], scale, zero [N, K/group]); a shape ``plan`` takes."""
    n, k, group = _dims(w, out_major)
    if group and not _int4_parts_fit(w, n, k, group):
        return False
    return ((group or x.dtype == w.dtype) and x.shape[-1] == k
            and plan(x.size // k, k, n, x.dtype, out_major=out_major, glu=glu, group=group) is not None)


def decode_matmul(x: jax.Array, w, out_dtype=None, *, out_major: bool = False, norm=None, eps: float = 1e-5,
                  glu: bool = False, residual=None, interpret=None, **tiles) -> jax.Array:
    """x [..., K] holding one row @ W, float32 accumulation -> [..., N] in ``out_dtype`` (default x's), for shapes
    the kernel ``takes`` (ValueError otherwise). w: W [K, N], or ``out_major`` W^T [N, K] (x's dtype), or
    ``out_major`` int4 parts (packed, scale, zero): uint32 words [N, K/8] (word i of row n holds W[8i + j, n] in
    bits 4j..4j+3, ``quant.pack_nibbles`` along K) and scale, zero [N, K/group], W = (q - zero) * scale per group.

    Out-major only (module docstring): ``norm`` [K], the RMSNorm's scale (``eps`` its epsilon), applied to x first;
    ``glu``: W = [W_gate | W_up] -> silu(gate) * up [..., N / 2]; ``residual`` [..., N] (x's dtype) added to the
    result. ``tiles`` override the plan's (block_n, block_k, num_warps, num_stages, and splits: K cut into that many
    parts, a program each, their float32 partials summed by XLA; the plain and residual products only).
    ``interpret`` (default: off a GPU) runs the Pallas interpreter. The forward only: ``layers.linear``, which calls
    the plain product, gives it its backward."""
    if (norm is not None or glu or residual is not None or isinstance(w, tuple)) and not out_major:
        raise ValueError("decode_matmul folds a norm, glu or residual, and takes int4 weights, in the out-major "
                         "product only (out_major=True, w = W^T [N, K] or its int4 parts).")
    if not takes(x, w, out_major=out_major, glu=glu):
        raise ValueError(f"decode_matmul takes one bf16/fp16 row x times w: of x's dtype, [K, N] (N >= {MIN_N}) or, "
                         f"out_major, [N, K] (N even; a multiple of 16 with glu), K a multiple of 256; or out_major "
                         f"int4 parts (uint32 [N, K/8], scale and zero [N, K/group], group a power of two >= 16); "
                         f"got x {x.shape} {x.dtype}, w {_describe(w)}.")
    n, k, group = _dims(w, out_major)
    if residual is not None and residual.shape[-1] != n:
        raise ValueError(f"decode_matmul's residual is {residual.shape}; it must end in N={n}.")
    chosen = {**plan(1, k, n, x.dtype, out_major=out_major, glu=glu, group=group), **tiles}
    _check_tiles(chosen, k, n, "decode_matmul", group)  # with glu, block_n counts both halves' outputs
    if glu and chosen["block_n"] < 2:
        raise ValueError("decode_matmul's block_n with glu counts both halves' outputs: at least 2.")
    splits = chosen.get("splits", 1)
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1 or (k // chosen["block_k"]) % splits:
        raise ValueError(f"decode_matmul's splits is {splits!r}; it must be a positive integer dividing the "
                         f"{k // chosen['block_k']} K tiles.")
    if splits > 1 and (norm is not None or glu):
        raise ValueError("decode_matmul splits K for the plain and residual products only (a norm or glu needs the "
                         "whole of K in one program); use splits=1.")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    r = None if residual is None else residual.reshape(1, n).astype(x.dtype)
    if splits == 1:
        y = _product(x.reshape(1, k), w, out_dtype, chosen, resolve_interpret(interpret), norm, eps, glu, r, out_major)
    else:  # float32 partial products summed here, then the kernel's epilogue
        y = jnp.sum(_product(x.reshape(1, k), w, F32, chosen, resolve_interpret(interpret), None, eps, False, None,
                             out_major), axis=0, keepdims=True)
        y = _epilogue([y], r, out_dtype, x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def qkv_plan(k: int, heads: int, kv_heads: int, head_dim: int, dtype, group: int = 0) -> dict | None:
    """Tiles for ``decode_qkv``, or None when it does not take the shapes: not bf16/fp16, K not a multiple of 256,
    or head_dim not a multiple of 8. A program computes block_n outputs of one head, half from each half of it (the
    rotation's pairs): block_n 8, block_k 512 where it divides K (else 256), 2 stages (the fastest of a sweep over
    block_n 8-32, block_k 256-512 and 2-3 stages at the 1.26B config's W_qkv on an H200: 14.4 us against XLA's
    18.1 for the product, the norm, the rotation and the cache writes). int4 weights in groups of ``group`` (a power
    of two >= 16 dividing K): block_n 16 (8 where head_dim is not a multiple of 16), block_k the largest power of
    two up to 1024 dividing K, 4 warps (7.2 us, the fastest of the same sweep as ``plan``'s)."""
    if jnp.dtype(dtype) not in DTYPES or k % 256 or head_dim % 8:
        return None
    if group:
        if not is_pow2(group) or group < 16 or k % group:
            return None
        return dict(block_n=16 if head_dim % 16 == 0 else 8, block_k=max(group, block_size(k, 1024)), num_warps=4,
                    num_stages=3)
    return dict(block_n=8, block_k=512 if k % 512 == 0 else 256, num_warps=4, num_stages=2)


def _qkv_kernel(*refs, block_k: int, steps: int, bh: int, heads: int, kv_heads: int, eps: float, group: int):
    """One (head t of q, k, v; block c): the outputs [c bh, (c + 1) bh) of both halves of head t's projection (rows
    of w [N, K], or of its int4 parts with ``group``), normalized, rotated (q's and k's heads) and stored: q's in q
    [1, heads d], k's and v's at the write index of layer ``layer`` of the caches [layers, 1, max_len, kv_heads, d]
    (aliased to the inputs). refs: position, index, layer [1]; one [1] (int4 only); x, norm scale [1, K]; inverse
    frequencies [1, d/2]; w (or packed, scale, zero); the caches (inputs); q and the caches (outputs)."""
    refs = list(refs)
    pos_ref, index_ref, layer_ref = refs[:3]
    one = refs[3][0] if group else None
    x_ref, s_ref, f_ref, *refs = refs[3 + bool(group):]
    w, (_, _, q_ref, k_ref, v_ref) = tuple(refs[:3 if group else 1]), refs[3 if group else 1:]  # caches: aliased
    t, c = pl.program_id(0), pl.program_id(1)
    d = k_ref.shape[-1]
    half, dtype = d // 2, x_ref.dtype
    col = t * d + c * bh

    def body(i, carry):
        a1, a2, ss = carry
        k0 = pl.multiple_of(i * block_k, block_k)
        xt, ss = _x_tile(x_ref, s_ref, k0, block_k, ss, group)
        a1 = _accumulate(a1, xt, w, pl.ds(col, bh), k0, True, group, one)
        a2 = _accumulate(a2, xt, w, pl.ds(col + half, bh), k0, True, group, one)
        return a1, a2, ss

    zeros = _zeros(bh, block_k, True, group)
    a1, a2, ss = jax.lax.fori_loop(0, steps, body, (zeros, zeros, _ss_zeros(block_k, group)))
    inv = _inv_rms(ss, steps * block_k, eps)
    y1, y2 = (_round(_value(a, True) * inv, dtype)[0] for a in (a1, a2))  # the projection, rounded as XLA's
    angle = pos_ref[0].astype(F32) * f_ref[0, pl.ds(c * bh, bh)]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rotated = t < heads + kv_heads
    r1 = jnp.where(rotated, y1 * cos - y2 * sin, y1)
    r2 = jnp.where(rotated, y2 * cos + y1 * sin, y2)

    @pl.when(t < heads)
    def _():
        q_ref[0, pl.ds(col, bh)] = r1.astype(q_ref.dtype)
        q_ref[0, pl.ds(col + half, bh)] = r2.astype(q_ref.dtype)

    index = jnp.clip(index_ref[0], 0, k_ref.shape[2] - 1)  # as dynamic_update_slice clamps
    for ref, first in ((k_ref, heads), (v_ref, heads + kv_heads)):
        @pl.when((t >= first) & (t < first + kv_heads))
        def _():
            at = (layer_ref[0], 0, index, t - first)
            ref[(*at, pl.ds(c * bh, bh))] = r1.astype(ref.dtype)
            ref[(*at, pl.ds(c * bh + half, bh))] = r2.astype(ref.dtype)


def decode_qkv(x, norm, w, k_cache, v_cache, *, heads: int, kv_heads: int, position, index, layer, theta: float,
               eps: float = 1e-5, interpret=None, **tiles):
    """A batch-1 step's attention input: n = RMSNorm(x) (scale ``norm`` [K], ``eps``), [q | k | v] = n @ W_qkv (w =
    W_qkv^T [(heads + 2 kv_heads) head_dim, K], out-major, x's dtype, or its int4 parts as ``decode_matmul`` takes
    them), q and k rotated at ``position`` (``layers.rope``: rotate-half pairs, ``theta``), and k, v written into
    layer ``layer`` of the stacked caches [layers, 1, max_len, kv_heads, head_dim] at ``index`` (clamped into the
    cache, as ``dynamic_update_slice`` does), in place.

    x [..., K] holding one row; position, index, layer: int or int32 scalars. Returns (q [..., heads, head_dim],
    k_cache, v_cache). ``tiles`` override ``qkv_plan``'s (block_n counts both halves' outputs)."""
    k = x.shape[-1]
    d = k_cache.shape[-1]
    n = (heads + 2 * kv_heads) * d
    w_n, w_k, group = _dims(w, True)
    fits = _int4_parts_fit(w, n, k, group) if group else w.dtype == x.dtype
    chosen = qkv_plan(k, heads, kv_heads, d, x.dtype, group)
    if (x.size != k or (w_n, w_k) != (n, k) or not fits or chosen is None or k_cache.ndim != 5
            or k_cache.shape[1] != 1 or k_cache.shape[3] != kv_heads or v_cache.shape != k_cache.shape):
        raise ValueError(f"decode_qkv takes one bf16/fp16 row x [K] (K a multiple of 256), w [(heads + 2 kv_heads) "
                         f"head_dim, K] of x's dtype (or its int4 parts) and caches [layers, 1, max_len, kv_heads, "
                         f"head_dim] (head_dim a multiple of 8); got x {x.shape} {x.dtype}, w {_describe(w)}, caches "
                         f"{k_cache.shape}, {v_cache.shape} for {heads} heads and {kv_heads} kv_heads.")
    chosen = {**chosen, **tiles}
    _check_tiles(chosen, k, d, "decode_qkv", group)
    bh, block_k = chosen["block_n"] // 2, chosen["block_k"]
    interpret = resolve_interpret(interpret)
    scalar = pl.BlockSpec((1,), lambda t, c: (0,))
    whole = pl.BlockSpec()  # the kernel indexes these itself
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=F32) / d))  # as layers.rope computes it
    scalars = [jnp.reshape(jnp.asarray(v, jnp.int32), (1,)) for v in (position, index, layer)]
    scalars += [_one_bits()] if group else []
    parts = list(_int4_operands(w, group)) if group else [w]
    rows = (k // group, group) if group else (1, k)  # x and the norm's scale (int4: one row per group)
    caches = len(scalars) + 3 + len(parts)  # the operand index of the k cache
    q, k_cache, v_cache = pl.pallas_call(
        functools.partial(_qkv_kernel, block_k=block_k, steps=k // block_k, bh=bh, heads=heads, kv_heads=kv_heads,
                          eps=eps, group=group),
        out_shape=[jax.ShapeDtypeStruct((1, heads * d), x.dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        grid=(heads + 2 * kv_heads, d // 2 // bh), in_specs=[scalar] * len(scalars) + [whole] * (5 + len(parts)),
        out_specs=[whole] * 3, input_output_aliases={caches: 1, caches + 1: 2}, interpret=interpret,
        compiler_params=compiler_params(interpret, chosen["num_warps"], chosen["num_stages"]),
        name=f"decode_qkv{f'_int4g{group}' if group else ''}_{k}x{n}")(
            *scalars, x.reshape(rows), norm.reshape(rows), inv_freq.reshape(1, d // 2), *parts, k_cache, v_cache)
    return q.reshape(*x.shape[:-1], heads, d), k_cache, v_cache
