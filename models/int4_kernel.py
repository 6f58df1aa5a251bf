"""The fused int4 weight-only matmul of ``awq.Int4`` for up to ``GEMV_ROWS`` rows (decoding) as one Pallas
(Triton) kernel: the packed words are read once and never written as floats.

    y[m, n] = sum_g s[g, n] (sum_{k in g} x[m, k] q[k, n] - z[g, n] sum_{k in g} x[m, k])

for W = (q - z) s per group g of ``group`` input rows (``quant.dequantize_groups``). ``gemv_plan`` picks the
tiles per shape, ``int4_gemv`` runs them; ``kernel_options`` parses an ``Int4.kernel`` string.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from models import quant
from models.flash_kernel import block_size, compiler_params, sm_count

GEMV_ROWS = 8  # the most rows x [M, K] the fused kernel takes (decoding batches); more rows dequantize + matmul
GEMV_OPTIONS = {"block_n": int, "block_k": int, "splits": int, "num_warps": int, "num_stages": int, "mode": str,
                "combine": str, "convert": str}


def kernel_options(kernel: str) -> tuple[str, dict]:
    """("pallas" | "interpret" | "", {option: value}) of an ``Int4.kernel`` string "NAME[:k=v,...]"."""
    name, _, rest = kernel.partition(":")
    opts = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k not in GEMV_OPTIONS:
            raise ValueError(f"unknown int4_gemv option {k!r} in kernel {kernel!r}; use some of "
                             f"{sorted(GEMV_OPTIONS)}.")
        opts[k] = GEMV_OPTIONS[k](v)
    return name, opts


def gemv_plan(m: int, k: int, n: int, group: int, *, block_n: int = 0, block_k: int = 0, splits: int = 0,
              num_warps: int = 0, num_stages: int = 3, mode: str = "", combine: str = "sum",
              convert: str = "") -> dict | None:
    """The tiling ``int4_gemv`` runs for x [m, K] times a [K, N] word-packed weight in groups of ``group``, or
    None when the shape has no fused path (then the weight is dequantized). Requested sizes are upper bounds
    fitted to the shape: block_n becomes the largest power of two <= it dividing N; block_k (K rows per loop
    step) a power of two dividing the group, or a multiple of the group dividing the split; splits (K slices)
    a divisor of the group count. mode: "fma" (default for one or two rows) or "dot" (default for more; needs
    loads of >= 128 rows). convert: "magic" (default) or "cast".

    Defaults for one or two rows (decoding at batch 1), per shape: one loop step per program (all its loads
    issued at once: block_k = its whole split), splits = the group count (fewer while the grid exceeds four
    programs per SM), block_n 512 with 8 warps, halved (4 warps) down to 16 while the grid has fewer programs
    than SMs (the 1.26B config: W_qkv 12 x 16 programs, W_o 16 x 16, W_gate_up 22 x 16, W_down 4 x 44; with
    splits=1, no split sums: 192 x 1, 128 x 1, 176 x 1, 128 x 1). On the H200 a program's time grew by about
    3.8 us a loop step and 512 columns with 8 warps beat 256 with 4 (bench_quant.py's gemv table, then timed
    on the host; timed on the device with "cast", 256 columns beat 512 at W_qkv and W_down and lost at
    W_gate_up, not yet tried in the model). The levels by the bit trick ("magic") made the 1.26B config's batch-1 int4
    step 1.121 ms against 1.182 and 1.182 with "cast" (one H200, one process: cast, magic, cast). For more
    rows ("dot"): block_n 256, about two programs per SM, one group per step, 8 warps (whose [16, block_n]
    accumulators take 255 registers a thread with 4)."""
    if (mode not in ("", "fma", "dot") or combine not in ("sum", "atomic")
            or convert not in ("", "magic", "cast")):
        raise ValueError(f"int4_gemv: mode {mode!r}, combine {combine!r}, convert {convert!r}; use mode 'fma' or "
                         f"'dot' (or '' to choose), combine 'sum' or 'atomic', convert 'magic' or 'cast' (or '').")
    if not 1 <= m <= GEMV_ROWS or group < 16 or group & (group - 1) or k % group or n % 16:
        return None
    groups, sms = k // group, sm_count()
    sub = min(block_k or group, group)  # K rows per load
    mode = mode or ("fma" if m <= 2 or sub < 128 else "dot")
    tuned = mode == "fma"  # the per-shape defaults above
    asked = splits
    splits = _divisor(groups, splits) if splits else groups
    fit_n = tuned and not block_n  # block_n chosen here: halved while the grid is too small
    block_n = block_size(n, max(block_n or (512 if tuned else 256), 16))
    while fit_n and block_n > 16 and (n // block_n) * splits < sms:
        block_n //= 2
    blocks = n // block_n
    if not asked and tuned:  # fewer, larger K slices while the grid exceeds four programs per SM
        while blocks * splits > 4 * sms and splits > 1:
            splits = _divisor(groups, splits - 1)
    elif not asked:
        splits = _divisor(groups, max(1, 2 * sms // blocks))
    per = groups // splits  # groups per program
    block_k = block_k or group * (per if tuned else 1)
    if block_k <= group:
        block_k = block_size(group, max(block_k, 16))
    else:
        block_k = group * _divisor(per, block_k // group)
    sub = min(block_k, group)
    if mode == "dot" and sub < 128:  # tensor-core products contract over >= 16 rows of words
        return None
    rows = 16 if mode == "dot" else m  # x rows (tensor-core products take 16: x is padded)
    return dict(m=m, words=k // 8, rows=rows, block_n=block_n, blocks=blocks, splits=splits, per=per,
                block_k=block_k, sub=sub,
                parts=max(1, block_k // group), steps=per * group // block_k,
                num_warps=num_warps or (8 if mode == "dot" or block_n >= 512 else  # [16, 16] words: 2 warps
                                        max(1, min(4, sub // 8 * block_n // 128))),
                num_stages=num_stages, mode=mode, combine=combine if splits > 1 else "sum",
                convert=convert or "magic")


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most (at least 1)."""
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


ONE_BITS = {jnp.dtype(jnp.float32): 0x3F800000, jnp.dtype(jnp.bfloat16): 0x3F80}  # 1.0's bits


def magic_levels(w, j: int, one, dtype=jnp.float32):
    """Nibble j (bits 4j..4j+3) of the uint32 words w as 1 + q/16 in ``dtype`` (float32 or bfloat16), exact: a shift
    and a mask put q in the mantissa of 1.0 (``one``: ``ONE_BITS[dtype]`` as a uint32, read by the kernel at run time
    so that mask and OR compile to one LOP3), no int-to-float conversion. Then x . q = 16 (x . v - sum x)."""
    if jnp.dtype(dtype) == jnp.bfloat16:  # 0x3F80: q into bits 3-6
        b = w >> (4 * j - 3) if j else w << 3
        return jax.lax.bitcast_convert_type(((b & 0x78) | one).astype(jnp.uint16), jnp.bfloat16)
    b = w << (19 - 4 * j) if 4 * j <= 19 else w >> (4 * j - 19)  # 0x3F800000: q into bits 19-22
    return jax.lax.bitcast_convert_type((b & 0x780000) | one, jnp.float32)


def _gemv_kernel(one_ref, x_ref, p_ref, s_ref, z_ref, *rest, plan: dict, group: int):
    """One (column block, K split) program: sum over its K rows of x_k q_k, loading [sub/8, block_n] tiles of
    uint32 words (nibble j of word row i is input row 8i + j), folded per group g as s_g (x_g . q_g - z_g sum
    x_g). "fma": x_ref [rows K/8, 8], float32 accumulators [sub/8, block_n] per row, summed over their word
    rows at the end; "dot": x_ref [16, K] (read with stride 8), accumulators [16, block_n]; o [rows, block_n].
    one_ref [1] holds the bits of 1.0 (read at run time, so that mask and OR compile to one LOP3)."""

    o_ref = rest[-1]
    wrows, parts, rows, gw = plan["sub"] // 8, plan["parts"], plan["rows"], group // 8
    dot_mode, magic = plan["mode"] == "dot", plan["convert"] == "magic"
    first = pl.program_id(1) * (plan["per"] * gw)  # this split's first word row
    one = one_ref[0] if magic else None

    def values(w, j):
        """Nibble j of the words w as (q + c) / unit: ``magic`` (c = unit = 16, ``magic_levels``); ``cast`` (c = 0,
        unit = 1) converts."""
        if magic:
            return magic_levels(w, j, one, jnp.bfloat16 if dot_mode else jnp.float32)
        return ((w >> (4 * j)) & 0xF).astype(jnp.bfloat16 if dot_mode else jnp.float32)

    c, unit = (16.0, 16.0) if magic else (0.0, 1.0)  # x . q = unit x . v - c sum x

    def body(i, acc):
        for t in range(parts):
            r = pl.multiple_of(first + (i * parts + t) * wrows, wrows)  # word row of this load
            g = jax.lax.div(r, gw)
            w = p_ref[pl.ds(r, wrows), :]
            s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)
            z = z_ref[pl.ds(g, 1), :].astype(jnp.float32) + c
            k0 = pl.multiple_of(8 * r, 8 * wrows)  # first input row of this load
            if dot_mode:  # eight [16, sub/8] x [sub/8, block_n] products on the tensor cores
                d = None
                for j in range(8):
                    xj = x_ref[:, pl.ds(k0 + j, wrows, stride=8)].astype(jnp.bfloat16)
                    dj = jnp.dot(xj, values(w, j), preferred_element_type=jnp.float32)
                    d = dj if d is None else dj + d
                xs = jnp.sum(x_ref[:, pl.ds(k0, 8 * wrows)].astype(jnp.bfloat16).astype(jnp.float32), axis=1,
                             keepdims=True)
                acc = acc + s * (unit * d - z * xs)
            else:  # a multiply-add per weight and row; the tile's word rows are summed once, after the loop
                for row in range(rows):  # x as [rows K/8, 8]: column j of the word rows is a [wrows, 1] load
                    base = row * plan["words"] + r
                    prod = xr = None
                    for j in range(8):
                        xj = x_ref[pl.ds(base, wrows), pl.ds(j, 1)].astype(jnp.float32)
                        prod = xj * values(w, j) if j == 0 else xj * values(w, j) + prod
                        xr = xj if j == 0 else xr + xj  # sum of each word row's eight inputs
                    acc = acc[:row] + (acc[row] + s * (unit * prod - z * xr),) + acc[row + 1:]
        return acc

    if dot_mode:
        init = jnp.zeros((rows, plan["block_n"]), jnp.float32)
    else:  # per row, [wrows, block_n] elementwise partial sums (no reduction across threads inside the loop)
        init = (jnp.zeros((wrows, plan["block_n"]), jnp.float32),) * rows
    acc = body(0, init) if plan["steps"] == 1 else jax.lax.fori_loop(0, plan["steps"], body, init)
    for row in range(1 if dot_mode else rows):
        if dot_mode:
            val, where = acc, (slice(None), slice(None))
        else:
            val, where = jnp.sum(acc[row], axis=0, keepdims=True), (pl.ds(row, 1), slice(None))
        if plan["combine"] == "atomic":
            plgpu.atomic_add(o_ref, where, val)
        else:
            o_ref[where] = val


def int4_gemv(x: jax.Array, packed: jax.Array, scale: jax.Array, zero: jax.Array, *, group: int,
              interpret: bool = False, **options) -> jax.Array:
    """x [K] or [M, K] (M <= ``GEMV_ROWS``) times the ``awq.Int4`` weight (packed uint32 [K/8, N], scale, zero
    [K/group, N]) -> float32 [N] or [M, N], fused: the packed words are read once, never written as floats.

    A Pallas (Triton) kernel over a grid (column blocks, K splits): each program reads its [K/splits, block_n]
    slice of the weight in [block_k/8, block_n] tiles of words (rows of 4 block_n contiguous bytes), takes
    the eight nibbles apart with shifts and masks and accumulates, per group g of rows, s_g (x_g . q_g - z_g
    sum x_g) in float32. mode "fma": float32 multiply-adds, row by row, x viewed as [M K/8, 8] (a free
    reshape: word row i's eight inputs in one row, so each nibble's inputs are a column load, no XLA op
    before the kernel); "dot": x rounded to bfloat16 and padded to 16 rows (read with stride 8), times the
    levels on the tensor cores. The K splits' partial sums are added by XLA (combine "sum") or
    atomically into a zeroed output ("atomic"). options: see ``gemv_plan``; shapes it cannot tile (and uint8
    storage) fall back to dequantize + matmul. ``interpret``: the same kernel in the Pallas interpreter (CPU)."""
    one = x.ndim == 1
    x2 = x.reshape(1, -1) if one else x
    m, k = x2.shape
    n = packed.shape[-1]
    if scale.shape != (k // group, n) or packed.shape[0] * quant.nibbles_per_word(packed.dtype) != k:
        raise ValueError(f"int4_gemv: x has {k} inputs but the weight is packed {packed.shape} {packed.dtype} with "
                         f"scale {scale.shape} (group {group}); give x [..., K] of the weight's K.")
    plan = gemv_plan(m, k, n, group, **options) if packed.dtype == jnp.uint32 else None
    if plan is None:
        y = x2.astype(jnp.float32) @ quant.dequantize_groups(packed, scale, zero, group)
        return y[0] if one else y
    rows, block_n, splits = plan["rows"], plan["block_n"], plan["splits"]
    if plan["mode"] == "dot":  # [16, K]: tensor-core products take 16 rows
        xs, x_block = jnp.pad(x2, ((0, rows - m), (0, 0))), (rows, k)
    else:  # [m K/8, 8] (a free reshape): row i holds the inputs of word row i's eight nibbles
        xs, x_block = x2.reshape(m * k // 8, 8), (m * k // 8, 8)
    bits_one = jnp.asarray([ONE_BITS[jnp.dtype(jnp.bfloat16 if plan["mode"] == "dot" else jnp.float32)]], jnp.uint32)
    groups = k // group
    in_specs = [pl.BlockSpec((1,), lambda j, s: (0,)),
                pl.BlockSpec(x_block, lambda j, s: (0, 0)),
                pl.BlockSpec((k // 8, block_n), lambda j, s: (0, j)),
                pl.BlockSpec((groups, block_n), lambda j, s: (0, j)),
                pl.BlockSpec((groups, block_n), lambda j, s: (0, j))]
    args = [bits_one, xs, packed, scale, zero]
    kernel = functools.partial(_gemv_kernel, plan=plan, group=group)
    params = compiler_params(interpret, plan["num_warps"], plan["num_stages"])
    call = functools.partial(pl.pallas_call, kernel, grid=(plan["blocks"], splits), interpret=interpret,
                             compiler_params=params, name=f"int4_gemv_{k}x{n}")  # a profile tells shapes apart
    if plan["combine"] == "atomic":  # every split adds into one zeroed output
        spec = pl.BlockSpec((rows, block_n), lambda j, s: (0, j))
        out = call(out_shape=jax.ShapeDtypeStruct((rows, n), jnp.float32), in_specs=in_specs + [spec],
                   out_specs=spec, input_output_aliases={5: 0})(*args, jnp.zeros((rows, n), jnp.float32))
    else:
        out = call(out_shape=jax.ShapeDtypeStruct((splits * rows, n), jnp.float32), in_specs=in_specs,
                   out_specs=pl.BlockSpec((rows, block_n), lambda j, s: (s, j)))(*args)
        out = out.reshape(splits, rows, n).sum(0)
    return out[0] if one else out[:m]
