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
v into the (stacked) KV cache in place. Each result is rounded to the compute dtype where XLA's unfused
ops round it (the product, silu, the gate, the rotation), so the two paths differ only in the order of
float32 sums and in the norm's scale, which is applied to the float32 product instead of to x.

On an H200, the 1.26B config's batch-1 step: 2.5-4.5% faster with W_qkv, W_gate_up and the LM head through
the [K, N] kernel than with the two-row GEMM; 1.27-1.29x faster again with the six-kernel layer
(``experiments/BENCHMARKS.md``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from models.flash_kernel import F32, compiler_params, is_pow2, resolve_interpret, sm_count

MIN_N = 3072  # the [K, N] kernel fills the GPU only this wide without a K split (the split form is not used)
DTYPES = (jnp.bfloat16, jnp.float16)


def plan(m: int, k: int, n: int, dtype, *, out_major: bool = False, glu: bool = False) -> dict | None:
    """Tiles for x [m, k] @ W [k, n] of ``dtype``, or None when no kernel takes the shape: m != 1, not bf16/fp16,
    K not a multiple of 256, or N not a multiple of block_n (with ``glu``, each half).

    [K, N] (the plain product only, N >= ``MIN_N``): block_n 64 while that gives at least two thirds of the SMs a
    program, else 32; block_k 256 (at the 1.26B config's W_qkv [2048, 6144] and W_gate_up [2048, 11264] on an
    H200: within 2% of the best of a sweep over block_n 16-64, block_k 256-512 and K splits 1-8).
    ``out_major``: block_n 2, block_k 512 where it divides K, else 256 (with ``glu``: block_n 16, both halves'
    outputs counted, and block_k 256): the fastest of a sweep on an H200 over block_n 2-32, block_k 256-512 and
    2-3 stages at the 1.26B config's shapes, device-timed (W_o 4.6 us against XLA's 8.2, W_down 8.6 against 11.7,
    W_gate_up with its norm and SwiGLU 13.9 against 17.6)."""
    if m != 1 or jnp.dtype(dtype) not in DTYPES or k % 256:
        return None
    if out_major:
        block_n = 16 if glu else 2
        if n % block_n:
            return None
        return dict(block_n=block_n, block_k=512 if k % 512 == 0 and not glu else 256, num_warps=4, num_stages=3)
    if glu or n < MIN_N:
        return None
    block_n = 64 if n // 64 >= 2 * sm_count() // 3 else 32
    return None if n % block_n else dict(block_n=block_n, block_k=256, num_warps=4, num_stages=3)


def _check_tiles(tiles: dict, k: int, outputs: int, what: str) -> None:
    """ValueError unless block_n and block_k are powers of two (Triton's blocks) dividing ``outputs`` and K."""
    for name, size in (("block_n", outputs), ("block_k", k)):
        value = tiles[name]
        if isinstance(value, bool) or not isinstance(value, int) or not is_pow2(value) or size % value:
            raise ValueError(f"{what}'s {name} is {value!r}; it must be a power of two dividing {size}.")


def _kernel(*refs, block_k: int, steps: int, norm: bool, glu: bool, residual: bool, eps: float, out_major: bool):
    """One program's outputs: the product of x and their weights accumulated over the K tiles (``_accumulate``),
    then the epilogue. refs: x [1, K], scale [1, K]?, W's slice [K, bn] or ``out_major`` [bn, K] (glu: W_gate's
    and W_up's), r [1, bn]? -> o [1, bn]."""
    refs = list(refs)
    x_ref = refs.pop(0)
    s_ref = refs.pop(0) if norm else None
    w_refs = [refs.pop(0) for _ in range(1 + glu)]
    r_ref = refs.pop(0) if residual else None
    (o_ref,) = refs

    def body(i, carry):
        accs, ss = carry
        k0 = pl.multiple_of(i * block_k, block_k)
        xk, ss = _norm_tile(x_ref, s_ref, k0, block_k, ss)
        tiles = [w[:, pl.ds(k0, block_k)] if out_major else w[pl.ds(k0, block_k), :] for w in w_refs]
        return tuple(_accumulate(a, xk, t, out_major) for a, t in zip(accs, tiles)), ss

    init = tuple(_zeros(o_ref.shape[-1], block_k, out_major) for _ in w_refs), jnp.zeros((1, block_k), F32)
    accs, ss = jax.lax.fori_loop(0, steps, body, init)
    ys = [_value(a, out_major) for a in accs]
    if norm:
        ys = [y * _inv_rms(ss, steps * block_k, eps) for y in ys]
    o_ref[...] = _epilogue(ys, r_ref[...] if residual else None, o_ref.dtype, x_ref.dtype)


def _norm_tile(x_ref, s_ref, k0, block_k: int, ss):
    """x's K tile at k0 [1, block_k] in x's dtype, times the norm's scale when there is one (``s_ref``), and the
    float32 squares of x added to ``ss`` [1, block_k] (summed once, after the loop)."""
    xk = x_ref[:, pl.ds(k0, block_k)]
    if s_ref is None:
        return xk, ss
    x32 = xk.astype(F32)
    return (x32 * s_ref[:, pl.ds(k0, block_k)].astype(F32)).astype(xk.dtype), ss + x32 * x32


def _inv_rms(ss, k: int, eps: float):
    """1 / sqrt(mean(x^2) + eps) [1, 1] from the per-lane sums of squares ss [1, block_k] over K = ``k`` elements."""
    return jax.lax.rsqrt(jnp.sum(ss, axis=1, keepdims=True) / k + eps)


def _zeros(bn: int, block_k: int, out_major: bool):
    return jnp.zeros((bn, block_k) if out_major else (16, bn), F32)


def _accumulate(acc, xk, w, out_major: bool):
    """acc + xk [1, block_k] times the tile w: out-major [bn, block_k], elementwise (acc [bn, block_k] of per-lane
    partial sums); else [block_k, bn] on the tensor cores (acc [16, bn], x broadcast to 16 equal rows)."""
    if out_major:
        return acc + w.astype(F32) * xk.astype(F32)
    return acc + jnp.dot(jnp.broadcast_to(xk, (16, xk.shape[-1])), w, preferred_element_type=F32)


def _value(acc, out_major: bool):
    """The accumulated product [1, bn]: the lanes summed (out-major), or one of the 16 equal rows."""
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


def _product(x, w, out_dtype, tiles: dict, interpret: bool, scale, eps, glu, residual, out_major):
    n, k = w.shape if out_major else w.shape[::-1]
    cols = n // 2 if glu else n
    bn = tiles["block_n"] // 2 if glu else tiles["block_n"]
    row = pl.BlockSpec((1, k), lambda j: (0, 0))
    if out_major:
        slices = [pl.BlockSpec((bn, k), lambda j, h=h: (j + h * cols // bn, 0)) for h in range(1 + glu)]
    else:
        slices = [pl.BlockSpec((k, bn), lambda j: (0, j))]
    in_specs = [row] * (1 + (scale is not None)) + slices + [pl.BlockSpec((1, bn), lambda j: (0, j))] * (
        residual is not None)
    args = [x, *([] if scale is None else [scale.reshape(1, k)]), *[w] * (1 + glu),
            *([] if residual is None else [residual])]
    form = "".join(f"_{name}" for name, on in (("norm", scale is not None), ("glu", glu),
                                                ("residual", residual is not None), ("t", out_major)) if on)
    return pl.pallas_call(
        functools.partial(_kernel, block_k=tiles["block_k"], steps=k // tiles["block_k"], norm=scale is not None,
                          glu=glu, residual=residual is not None, eps=eps, out_major=out_major),
        out_shape=jax.ShapeDtypeStruct((1, cols), out_dtype), grid=(cols // bn,),
        in_specs=in_specs, out_specs=pl.BlockSpec((1, bn), lambda j: (0, j)),
        interpret=interpret, compiler_params=compiler_params(interpret, tiles["num_warps"], tiles["num_stages"]),
        name=f"decode_matmul{form}_{k}x{n}")(*args)


def takes(x: jax.Array, w: jax.Array, *, out_major: bool = False, glu: bool = False) -> bool:
    """Whether ``decode_matmul`` multiplies x [..., K] by w ([K, N], or [N, K] ``out_major``): same dtype and a
    shape ``plan`` takes."""
    n, k = w.shape if out_major else w.shape[::-1]
    return (x.dtype == w.dtype and x.shape[-1] == k
            and plan(x.size // k, k, n, x.dtype, out_major=out_major, glu=glu) is not None)


def decode_matmul(x: jax.Array, w: jax.Array, out_dtype=None, *, out_major: bool = False, norm=None, eps: float = 1e-5,
                  glu: bool = False, residual=None, interpret=None, **tiles) -> jax.Array:
    """x [..., K] holding one row @ W (w: W [K, N], or ``out_major`` W^T [N, K]; x's dtype), float32 accumulation ->
    [..., N] in ``out_dtype`` (default x's), for shapes the kernel ``takes`` (ValueError otherwise).

    Out-major only (module docstring): ``norm`` [K], the RMSNorm's scale (``eps`` its epsilon), applied to x first;
    ``glu``: W = [W_gate | W_up] -> silu(gate) * up [..., N / 2]; ``residual`` [..., N] (x's dtype) added to the
    result. ``tiles`` override the plan's (block_n, block_k, num_warps, num_stages). ``interpret`` (default: off a
    GPU) runs the Pallas interpreter. The forward only: ``layers.linear``, which calls the plain product, gives it
    its backward."""
    if (norm is not None or glu or residual is not None) and not out_major:
        raise ValueError("decode_matmul folds a norm, glu or residual into the out-major product only (out_major=True, "
                         "w = W^T [N, K]).")
    if not takes(x, w, out_major=out_major, glu=glu):
        raise ValueError(f"decode_matmul takes one bf16/fp16 row x of w's dtype times w [K, N] (N >= {MIN_N}) or, "
                         f"out_major, [N, K] (N even; a multiple of 16 with glu), K a multiple of 256; got x "
                         f"{x.shape} {x.dtype}, w {w.shape} {w.dtype}.")
    n, k = w.shape if out_major else w.shape[::-1]
    if residual is not None and residual.shape[-1] != n:
        raise ValueError(f"decode_matmul's residual is {residual.shape}; it must end in N={n}.")
    chosen = {**plan(1, k, n, x.dtype, out_major=out_major, glu=glu), **tiles}
    _check_tiles(chosen, k, n, "decode_matmul")  # with glu, block_n counts both halves' outputs: a divisor of N
    if glu and chosen["block_n"] < 2:
        raise ValueError("decode_matmul's block_n with glu counts both halves' outputs: at least 2.")
    y = _product(x.reshape(1, k), w, jnp.dtype(out_dtype or x.dtype), chosen, resolve_interpret(interpret), norm, eps,
                 glu, None if residual is None else residual.reshape(1, n).astype(x.dtype), out_major)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def qkv_plan(k: int, heads: int, kv_heads: int, head_dim: int, dtype) -> dict | None:
    """Tiles for ``decode_qkv``, or None when it does not take the shapes: not bf16/fp16, K not a multiple of 256,
    or head_dim not a multiple of 8. A program computes block_n outputs of one head, half from each half of it (the
    rotation's pairs): block_n 8, block_k 512 where it divides K (else 256), 2 stages (the fastest of a sweep over
    block_n 8-32, block_k 256-512 and 2-3 stages at the 1.26B config's W_qkv on an H200: 14.4 us against XLA's
    18.1 for the product, the norm, the rotation and the cache writes)."""
    if jnp.dtype(dtype) not in DTYPES or k % 256 or head_dim % 8:
        return None
    return dict(block_n=8, block_k=512 if k % 512 == 0 else 256, num_warps=4, num_stages=2)


def _qkv_kernel(pos_ref, index_ref, layer_ref, x_ref, s_ref, f_ref, w_ref, _k_in, _v_in, q_ref, k_ref, v_ref, *,
                block_k: int, steps: int, bh: int, heads: int, kv_heads: int, eps: float):
    """One (head t of q, k, v; block c): the outputs [c bh, (c + 1) bh) of both halves of head t's projection (rows
    of w [N, K]), normalized, rotated (q's and k's heads) and stored: q's in q [1, heads d], k's and v's at the
    write index of layer ``layer`` of the caches [layers, 1, max_len, kv_heads, d] (aliased to the inputs)."""
    t, c = pl.program_id(0), pl.program_id(1)
    d = k_ref.shape[-1]
    half, dtype = d // 2, x_ref.dtype
    col = t * d + c * bh

    def body(i, carry):
        a1, a2, ss = carry
        k0 = pl.multiple_of(i * block_k, block_k)
        xk, ss = _norm_tile(x_ref, s_ref, k0, block_k, ss)
        a1 = _accumulate(a1, xk, w_ref[pl.ds(col, bh), pl.ds(k0, block_k)], True)
        a2 = _accumulate(a2, xk, w_ref[pl.ds(col + half, bh), pl.ds(k0, block_k)], True)
        return a1, a2, ss

    zeros = _zeros(bh, block_k, True)
    a1, a2, ss = jax.lax.fori_loop(0, steps, body, (zeros, zeros, jnp.zeros((1, block_k), F32)))
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
    W_qkv^T [(heads + 2 kv_heads) head_dim, K], out-major, x's dtype), q and k rotated at ``position``
    (``layers.rope``: rotate-half pairs, ``theta``), and k, v written into layer ``layer`` of the stacked caches
    [layers, 1, max_len, kv_heads, head_dim] at ``index`` (clamped into the cache, as ``dynamic_update_slice``
    does), in place.

    x [..., K] holding one row; position, index, layer: int or int32 scalars. Returns (q [..., heads, head_dim],
    k_cache, v_cache). ``tiles`` override ``qkv_plan``'s (block_n counts both halves' outputs)."""
    k = x.shape[-1]
    d = k_cache.shape[-1]
    n = (heads + 2 * kv_heads) * d
    chosen = qkv_plan(k, heads, kv_heads, d, x.dtype)
    if (x.size != k or w.shape != (n, k) or w.dtype != x.dtype or chosen is None or k_cache.ndim != 5
            or k_cache.shape[1] != 1 or k_cache.shape[3] != kv_heads or v_cache.shape != k_cache.shape):
        raise ValueError(f"decode_qkv takes one bf16/fp16 row x [K] (K a multiple of 256), w [(heads + 2 kv_heads) "
                         f"head_dim, K] of x's dtype and caches [layers, 1, max_len, kv_heads, head_dim] (head_dim "
                         f"a multiple of 8); got x {x.shape} {x.dtype}, w {w.shape} {w.dtype}, caches "
                         f"{k_cache.shape}, {v_cache.shape} for {heads} heads and {kv_heads} kv_heads.")
    chosen = {**chosen, **tiles}
    _check_tiles(chosen, k, d, "decode_qkv")
    bh, block_k = chosen["block_n"] // 2, chosen["block_k"]
    interpret = resolve_interpret(interpret)
    scalar = pl.BlockSpec((1,), lambda t, c: (0,))
    whole = pl.BlockSpec()  # the kernel indexes these itself
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=F32) / d))  # as layers.rope computes it
    scalars = [jnp.reshape(jnp.asarray(v, jnp.int32), (1,)) for v in (position, index, layer)]
    q, k_cache, v_cache = pl.pallas_call(
        functools.partial(_qkv_kernel, block_k=block_k, steps=k // block_k, bh=bh, heads=heads, kv_heads=kv_heads,
                          eps=eps),
        out_shape=[jax.ShapeDtypeStruct((1, heads * d), x.dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)],
        grid=(heads + 2 * kv_heads, d // 2 // bh), in_specs=[scalar] * 3 + [whole] * 6, out_specs=[whole] * 3,
        input_output_aliases={7: 1, 8: 2}, interpret=interpret,
        compiler_params=compiler_params(interpret, chosen["num_warps"], chosen["num_stages"]),
        name=f"decode_qkv_{k}x{n}")(*scalars, x.reshape(1, k), norm.reshape(1, k), inv_freq.reshape(1, d // 2), w,
                                     k_cache, v_cache)
    return q.reshape(*x.shape[:-1], heads, d), k_cache, v_cache
