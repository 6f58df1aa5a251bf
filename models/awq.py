"""AWQ (Lin et al. 2024): activation-aware, group-wise, weight-only int4 / int3 quantization.

Weights W [in, out] are quantized asymmetrically in groups of ``group`` (default 128) consecutive input
channels per output column (``quant.asymmetric``): W ~ (q - z) s with q in [0, 2^bits - 1], one scale s and
zero z per (group, column). Round-to-nearest (RTN) is that alone. AWQ protects the salient input channels
(large mean |x|) by scaling them up before quantization (sec. 3.2, eq. 4-5):

    Q(W diag(s)) (diag(s)^-1 X),   s = s_X^alpha,   alpha* = argmin_alpha || Q(W diag(s)) (s^-1 X) - W X ||

with s_X the per-channel mean |x| from calibration, s normalised by sqrt(max(s) min(s)) (the reference
implementation), alpha over a grid of 20 values in [0, 1), the error measured on the calibration inputs
over every linear that reads the same input. diag(s)^-1 X is folded into the operator before: the RMSNorm
scale for W_q, W_k, W_v and W_gate, W_up (and the router of a Switch layer, which stays in float), W_up's
output columns for W_down (h = silu(x W_gate) * (x W_up) is linear in W_up's columns), W_v's output columns
for W_o when every query head has its own value head (otherwise W_o is not scaled). Then the clipping
range: per (group, column), the range [min, max] shrunk by the ratio in {1, 0.975, ..., 0.525} that
minimises that group's share of the output error on the calibration inputs.

Expert weights of Switch layers: W_gate, W_up share one scale over every expert (the norm feeds them all;
the search runs on the layer's MLP input), W_down one per expert on the tokens routed to it.

GPTQ (Frantar et al. 2022, ``gptq_levels``) is a second baseline: the same grid, levels chosen channel by
channel with each rounding error compensated on the channels not yet quantized (inverse-Hessian updates).

``Int4`` stores q packed eight per uint32 word along the input axis (int3 too: 3-bit values in 4-bit
nibbles; two per uint8 byte where the input dimension is not a multiple of 8), with float16 scales and zeros
per group, and dequantizes inside ``matmul`` (a ``weights.Weight``): 0.5 + 4 / group bytes per parameter,
0.27x of bfloat16 at group 128. Up to 8 rows (decoding) can instead run ``int4_gemv``, a fused Pallas kernel
that reads the words once and never writes the float weight.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import quant, weights
from models.smoothquant import _check_family, _host_layers, is_block_linear, layer_slots

GRID = 20  # alpha grid and clipping grid sizes (AWQ's n_grid)
MAX_SHRINK = 0.5  # smallest clipping ratio 1 - MAX_SHRINK (exclusive)


@flax.struct.dataclass
class Int4(weights.Weight):
    """Packed b-bit (b <= 4) weight: packed uint32 [..., in/8, out] (word i of a column holds q[8i + j] in bits
    4j..4j+3; uint8 [..., in/2, out] with two per byte where in % 8 != 0, and in files written before words),
    scale and zero float16 [..., in/group, out]; W = (q - zero) * scale per group of input channels."""

    packed: Any
    scale: Any
    zero: Any
    bits: int = flax.struct.field(pytree_node=False, default=4)
    group: int = flax.struct.field(pytree_node=False, default=128)
    kernel: str = flax.struct.field(pytree_node=False, default="")  # "", "pallas[:tiles]", "interpret" (matmul)
    out_last = True  # packed, scale and zero all end in the output axis: columns join (decode_params' W_qkv)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight [..., in, out] in ``dtype``."""
        q = quant.unpack_nibbles(self.packed, self.packed.ndim - 2).astype(jnp.float32)
        *lead, n_in, out = q.shape
        qg = q.reshape(*lead, n_in // self.group, self.group, out)
        w = (qg - self.zero.astype(jnp.float32)[..., None, :]) * self.scale.astype(jnp.float32)[..., None, :]
        return w.reshape(*lead, n_in, out).astype(dtype)

    def matmul(self, x, dot: weights.Dot):
        """x times the dequantized weight; with ``kernel`` "pallas" ("interpret": the same kernel on CPU; tile
        options after a colon, see ``with_kernel``) up to ``GEMV_ROWS`` rows (decoding, dense form) run
        ``int4_gemv``, which never writes the float weight."""
        rows = x.size // x.shape[-1] if x.ndim else 0
        if (self.kernel and dot.form == "dense" and not dot.transpose and 1 <= rows <= GEMV_ROWS
                and self.packed.ndim == 2):
            name, opts = kernel_options(self.kernel)
            y = int4_gemv(x.reshape(rows, -1), self.packed, self.scale, self.zero, group=self.group,
                          interpret=name == "interpret", **opts)
            return y.reshape(*x.shape[:-1], -1).astype(dot.out_dtype or x.dtype)
        return dot(x, self.dequantize(x.dtype))

    def num_params(self) -> int:
        return int(np.prod(self.packed.shape)) * (8 if self.packed.dtype == jnp.uint32 else 2)


def with_kernel(params, kernel: str = "pallas", **options):
    """``params`` with every ``Int4`` set to use ``kernel`` ("pallas", or "interpret" on CPU) for up to
    ``GEMV_ROWS`` rows (decoding); ``options``: tile settings of ``int4_gemv`` (block_n=256, splits=8, ...),
    kept in the weight's static ``kernel`` string ("pallas:block_n=256,splits=8")."""
    for name in options:
        if name not in GEMV_OPTIONS:
            raise ValueError(f"unknown int4_gemv option {name!r}; use some of {sorted(GEMV_OPTIONS)}.")
    spec = kernel + (":" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) if options and kernel else "")
    return jax.tree.map(lambda w: w.replace(kernel=spec) if isinstance(w, Int4) else w, params,
                        is_leaf=lambda w: isinstance(w, Int4))


GEMV_ROWS = 8  # the most rows x [M, K] the fused kernel takes (decoding batches); more rows dequantize + matmul
GEMV_OPTIONS = {"block_n": int, "block_k": int, "splits": int, "num_warps": int, "num_stages": int, "mode": str,
                "combine": str, "convert": str}
_SMS = 132  # streaming multiprocessors of an H200: the default K split aims at about two programs per SM


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


def _pow2_divisor(n: int, at_most: int) -> int:
    """The largest power of two <= at_most dividing n."""
    d = 1
    while d * 2 <= at_most and n % (d * 2) == 0:
        d *= 2
    return d


def gemv_plan(m: int, k: int, n: int, group: int, *, block_n: int = 0, block_k: int = 0, splits: int = 0,
              num_warps: int = 0, num_stages: int = 3, mode: str = "", combine: str = "sum",
              convert: str = "") -> dict | None:
    """The tiling ``int4_gemv`` runs for x [m, K] times a [K, N] word-packed weight in groups of ``group``, or
    None when the shape has no fused path (then the weight is dequantized). Requested sizes are upper bounds
    fitted to the shape: block_n becomes the largest power of two <= it dividing N; block_k (K rows per loop
    step) a power of two dividing the group, or a multiple of the group dividing the split; splits (K slices)
    a divisor of the group count. mode: "fma" (default for one or two rows) or "dot" (default for more; needs
    loads of >= 128 rows). convert: "cast" (default for "fma") or "magic" (default for "dot").

    Defaults for one or two rows (decoding at batch 1), per shape: one loop step per program (all its loads
    issued at once: block_k = its whole split), splits = the group count (fewer while the grid exceeds four
    programs per SM), block_n 512 with 8 warps, halved (4 warps) down to 16 while the grid has fewer programs
    than SMs (the 1.26B config: W_qkv 12 x 16 programs, W_o 16 x 16, W_gate_up 22 x 16, W_down 4 x 44; with
    splits=1, no split sums: 192 x 1, 128 x 1, 176 x 1, 128 x 1). On the H200 a program's time grew by about
    3.8 us a loop step and 512 columns with 8 warps beat 256 with 4 (bench_quant.py's gemv table). For more
    rows ("dot"): block_n 256, about two programs per SM, one group per step, 8 warps (whose [16, block_n]
    accumulators take 255 registers a thread with 4)."""
    if (mode not in ("", "fma", "dot") or combine not in ("sum", "atomic")
            or convert not in ("", "magic", "cast")):
        raise ValueError(f"int4_gemv: mode {mode!r}, combine {combine!r}, convert {convert!r}; use mode 'fma' or "
                         f"'dot' (or '' to choose), combine 'sum' or 'atomic', convert 'magic' or 'cast' (or '').")
    if not 1 <= m <= GEMV_ROWS or group < 16 or group & (group - 1) or k % group or n % 16:
        return None
    groups = k // group
    sub = min(block_k or group, group)  # K rows per load
    mode = mode or ("fma" if m <= 2 or sub < 128 else "dot")
    tuned = mode == "fma"  # the per-shape defaults above
    asked = splits
    splits = _divisor(groups, splits) if splits else groups
    fit_n = tuned and not block_n  # block_n chosen here: halved while the grid is too small
    block_n = _pow2_divisor(n, max(block_n or (512 if tuned else 256), 16))
    while fit_n and block_n > 16 and (n // block_n) * splits < _SMS:
        block_n //= 2
    blocks = n // block_n
    if not asked and tuned:  # fewer, larger K slices while the grid exceeds four programs per SM
        while blocks * splits > 4 * _SMS and splits > 1:
            splits = _divisor(groups, splits - 1)
    elif not asked:
        splits = _divisor(groups, max(1, 2 * _SMS // blocks))
    per = groups // splits  # groups per program
    block_k = block_k or group * (per if tuned else 1)
    if block_k <= group:
        block_k = _pow2_divisor(group, max(block_k, 16))
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
                convert=convert or ("cast" if mode == "fma" else "magic"))


def _divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most (at least 1)."""
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def _gemv_kernel(one_ref, x_ref, p_ref, s_ref, z_ref, *rest, plan: dict, group: int):
    """One (column block, K split) program: sum over its K rows of x_k q_k, loading [sub/8, block_n] tiles of
    uint32 words (nibble j of word row i is input row 8i + j), folded per group g as s_g (x_g . q_g - z_g sum
    x_g). "fma": x_ref [rows K/8, 8], float32 accumulators [sub/8, block_n] per row, summed over their word
    rows at the end; "dot": x_ref [16, K] (read with stride 8), accumulators [16, block_n]; o [rows, block_n].
    one_ref [1] holds the bits of 1.0 (read at run time, so that mask and OR compile to one LOP3)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    o_ref = rest[-1]
    wrows, parts, rows, gw = plan["sub"] // 8, plan["parts"], plan["rows"], group // 8
    dot_mode, magic = plan["mode"] == "dot", plan["convert"] == "magic"
    first = pl.program_id(1) * (plan["per"] * gw)  # this split's first word row
    one = one_ref[0] if magic else None

    def values(w, j):
        """Nibble j of the words w as (q + c) / unit: ``magic`` (c = unit = 16) puts q in the mantissa of 1.0 with
        a shift and a mask (1 + q/16, exact, no int-to-float conversion); ``cast`` (c = 0, unit = 1) converts."""
        if magic and dot_mode:  # bfloat16 1.0 is 0x3F80: q into bits 3-6
            b = w >> (4 * j - 3) if j else w << 3
            return jax.lax.bitcast_convert_type(((b & 0x78) | one).astype(jnp.uint16), jnp.bfloat16)
        if magic:  # float32 1.0 is 0x3F800000: q into bits 19-22
            b = w << (19 - 4 * j) if 4 * j <= 19 else w >> (4 * j - 19)
            return jax.lax.bitcast_convert_type((b & 0x780000) | one, jnp.float32)
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
    """x [K] or [M, K] (M <= ``GEMV_ROWS``) times the ``Int4`` weight (packed uint32 [K/8, N], scale, zero
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
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    one = x.ndim == 1
    x2 = x.reshape(1, -1) if one else x
    m, k = x2.shape
    n = packed.shape[-1]
    if scale.shape != (k // group, n) or packed.shape[0] * (8 if packed.dtype == jnp.uint32 else 2) != k:
        raise ValueError(f"int4_gemv: x has {k} inputs but the weight is packed {packed.shape} {packed.dtype} with "
                         f"scale {scale.shape} (group {group}); give x [..., K] of the weight's K.")
    plan = gemv_plan(m, k, n, group, **options) if packed.dtype == jnp.uint32 else None
    if plan is None:
        y = x2.astype(jnp.float32) @ Int4(packed, scale, zero, 4, group).dequantize()
        return y[0] if one else y
    rows, block_n, splits = plan["rows"], plan["block_n"], plan["splits"]
    if plan["mode"] == "dot":  # [16, K]: tensor-core products take 16 rows
        xs, x_block = jnp.pad(x2, ((0, rows - m), (0, 0))), (rows, k)
    else:  # [m K/8, 8] (a free reshape): row i holds the inputs of word row i's eight nibbles
        xs, x_block = x2.reshape(m * k // 8, 8), (m * k // 8, 8)
    bits_one = jnp.asarray([0x3F80 if plan["mode"] == "dot" else 0x3F800000], jnp.uint32)  # 1.0's bits
    groups = k // group
    in_specs = [pl.BlockSpec((1,), lambda j, s: (0,)),
                pl.BlockSpec(x_block, lambda j, s: (0, 0)),
                pl.BlockSpec((k // 8, block_n), lambda j, s: (0, j)),
                pl.BlockSpec((groups, block_n), lambda j, s: (0, j)),
                pl.BlockSpec((groups, block_n), lambda j, s: (0, j))]
    args = [bits_one, xs, packed, scale, zero]
    kernel = functools.partial(_gemv_kernel, plan=plan, group=group)
    params = None if interpret else plgpu.CompilerParams(num_warps=plan["num_warps"], num_stages=plan["num_stages"])
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


def _per_word(n_in: int) -> int:
    """4-bit values per packed word: 8 (uint32) when they fill whole words, else 2 (uint8)."""
    return 8 if n_in % 8 == 0 else 2


def check_group(n_in: int, group: int, what: str = "a weight") -> None:
    if group <= 0 or n_in % group:
        raise ValueError(f"group size {group} does not divide the input dimension {n_in} of {what}; choose a divisor "
                         f"of {n_in} (e.g. {max(g for g in (1, 2, 4, 8, 16, 32, 64, 128) if n_in % g == 0)}).")


def fake_quantize(w: jax.Array, bits: int, group: int, ratio: Any = 1.0) -> jax.Array:
    """Quantize and dequantize w [in, out] (float32) group-wise; ``ratio`` scalar or [in/group, out] (clipping)."""
    n_in, out = w.shape
    wg = w.astype(jnp.float32).reshape(n_in // group, group, out)
    r = ratio if np.ndim(ratio) == 0 else jnp.asarray(ratio)[:, None, :]
    s, z = quant.asymmetric_params(wg, bits, axis=1, ratio=r)
    return ((quant.asymmetric(wg, s, z, bits).astype(jnp.float32) - z) * s).reshape(n_in, out)


def pack(w: jax.Array, bits: int, group: int, ratio: Any = 1.0) -> Int4:
    """``Int4`` of w [..., in, out] (leading axes: layers, experts); ``ratio`` broadcasts to [..., in/group, out]."""
    if not 2 <= bits <= 4:
        raise ValueError(f"bits is {bits}; AWQ here stores 2 to 4 bits per weight (int4, int3).")
    check_group(w.shape[-2], group)
    return _pack(jnp.asarray(w), jnp.asarray(ratio, jnp.float32), bits, group)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _pack(w, ratio, bits, group):
    *lead, n_in, out = w.shape
    wg = jnp.asarray(w, jnp.float32).reshape(*lead, n_in // group, group, out)
    r = ratio if np.ndim(ratio) == 0 else jnp.asarray(ratio)[..., None, :]
    s, z = quant.asymmetric_params(wg, bits, axis=-2, ratio=r)
    q = quant.asymmetric(wg, s, z, bits).reshape(*lead, n_in, out)
    return Int4(quant.pack_nibbles(q, len(lead), _per_word(n_in)), s[..., 0, :].astype(jnp.float16),
                z[..., 0, :].astype(jnp.float16), bits, group)


@functools.partial(jax.jit, static_argnames=("bits", "group", "grid"))
def scale_errors(x: jax.Array, w: jax.Array, mean_abs: jax.Array, *, bits: int, group: int, grid: int = GRID):
    """Output error mean((x W_alpha - x W)^2) for alpha = 0, 1/grid, ..., (grid-1)/grid, with W_alpha =
    Q(W diag(s)) diag(s)^-1, s = mean_abs^alpha / sqrt(max min). x [n, in], w [in, out] -> [grid]."""
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    y = x @ w

    def one(alpha):
        s = alpha_scales(mean_abs, alpha)
        wq = fake_quantize(w * s[:, None], bits, group) / s[:, None]
        return jnp.mean((x @ wq - y) ** 2)

    return jax.lax.map(one, jnp.arange(grid, dtype=jnp.float32) / grid)


def alpha_scales(mean_abs, alpha):
    """s = clamp(mean_abs^alpha, 1e-4) / sqrt(max(s) min(s)) (AWQ's reference normalisation)."""
    s = jnp.maximum(jnp.asarray(mean_abs, jnp.float32) ** alpha, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("bits", "group", "grid"))
def clip_ratios(x: jax.Array, w: jax.Array, *, bits: int, group: int, grid: int = GRID) -> jax.Array:
    """Per (group, column) the clipping ratio of {1 - k MAX_SHRINK / grid} minimising that group's output
    error sum_n (x_g (W_g - Q_r(W_g)))^2 on x [n, in]; w [in, out] -> [in/group, out]."""
    n_in, out = w.shape
    xg = x.astype(jnp.float32).reshape(x.shape[0], n_in // group, group)
    wg = w.astype(jnp.float32).reshape(n_in // group, group, out)
    ratios = 1.0 - jnp.arange(grid, dtype=jnp.float32) / grid * MAX_SHRINK

    def one(r):
        s, z = quant.asymmetric_params(wg, bits, axis=1, ratio=r)
        d = wg - (quant.asymmetric(wg, s, z, bits).astype(jnp.float32) - z) * s
        return jnp.sum(jnp.einsum("ngk,gko->ngo", xg, d) ** 2, axis=0)

    return ratios[jnp.argmin(jax.lax.map(one, ratios), axis=0)]


def search(x: np.ndarray, ws: list, mean_abs: np.ndarray, *, bits: int, group: int, grid: int = GRID):
    """(alpha*, s [in]) for the linears ``ws`` ([in, out_k] each) reading inputs x [n, in]."""
    w = jnp.concatenate([jnp.asarray(a, jnp.float32) for a in ws], axis=1)
    errs = np.asarray(scale_errors(jnp.asarray(x), w, jnp.asarray(mean_abs), bits=bits, group=group, grid=grid))
    alpha = float(np.argmin(errs)) / grid
    return alpha, np.asarray(alpha_scales(mean_abs, alpha), np.float64)


# ----------------------------------------------------------------------------- the model

def _inputs(calib: dict, key: str, expert: int | None = None) -> np.ndarray:
    """The sampled input rows of calib[key]; for one ``expert``, its rows followed by zero rows up to the
    sample's length (zero rows add nothing to any output error, and one shape serves every expert)."""
    st = calib.get(key)
    if st is None or "inputs" not in st:
        raise ValueError(f"calibration data lack sampled inputs of {key!r}; run quant.calibrate(..., inputs=k).")
    x = st["inputs"]
    if expert is not None:
        mine = st["segments"] == expert
        x = np.concatenate([x[mine], np.zeros((int((~mine).sum()), x.shape[1]), x.dtype)])
    return x


def _has_rows(calib: dict, key: str, expert: int) -> bool:
    return bool(np.any(calib[key]["segments"] == expert))


def quantize(params: dict, axes: dict, cfg, calib: dict | None = None, *, bits: int = 4, group: int = 128,
             method: str = "awq", clip: bool = True, grid: int = GRID) -> tuple[dict, dict, dict]:
    """Every block projection as an ``Int4`` weight -> (params, axes, report).

    method "rtn": round to nearest. "awq": activation-aware scales folded into the operator before, then
    (``clip``) the clipping search; "gptq": the GPTQ baseline (``gptq_levels``). AWQ and GPTQ need ``calib``
    from ``quant.calibrate(..., inputs=k)`` of this model. report: {"alpha": {"layer<i>/<part>": alpha}}.
    """
    _check_family(cfg)
    if method not in ("awq", "rtn", "gptq"):
        raise ValueError(f"method is {method!r}; use 'awq', 'rtn' or 'gptq'.")
    if method != "rtn" and calib is None:
        raise ValueError(f"{method.upper()} needs calibration data; pass calib=quant.calibrate(model, cfg, params, "
                         f"tokens, inputs=k).")
    for name, d_in in (("d_model", cfg.d_model), ("d_ff", cfg.d_ff),
                       ("n_heads * head_dim", cfg.n_heads * cfg.head_dim)):
        check_group(d_in, group, f"the linears reading {name}")
    if not 2 <= bits <= 4:
        raise ValueError(f"bits is {bits}; AWQ here stores 2 to 4 bits per weight (int4, int3).")
    if method == "gptq":
        return (*gptq_model(params, axes, cfg, calib, bits=bits, group=group), {"alpha": {}})
    if method == "awq":
        new_params, ratios, report = search_and_fold(params, cfg, calib, bits=bits, group=group, clip=clip, grid=grid)
    else:
        new_params, ratios, report = params, {}, {"alpha": {}}
    qp, qa = pack_model(new_params, axes, ratios, bits=bits, group=group)
    return qp, qa, report


def pack_model(params: dict, axes: dict, ratios: dict | None = None, *, bits: int = 4, group: int = 128
               ) -> tuple[dict, dict]:
    """Every block projection of ``params`` as an ``Int4`` (clipping ratios from ``search_and_fold``, else 1)."""
    ratios = ratios or {}

    def make(path, w, names):
        lead = w.shape[:-2]
        r = np.ones((*lead, w.shape[-2] // group, w.shape[-1]), np.float32)
        for (leaf, idx), ratio in ratios.items():
            if leaf == path:
                r[idx] = ratio
        packed = pack(w, bits, group, r)
        node_axes = Int4(tuple(names), tuple(names), tuple(names), bits, group)
        return packed, node_axes

    return weights.wrap(params, axes, make, is_block_linear)


def search_and_fold(params: dict, cfg, calib: dict, *, bits: int = 4, group: int = 128, clip: bool = True,
                    grid: int = GRID) -> tuple[dict, dict, dict]:
    """AWQ's searches: (float params with the scales folded in: the same function as ``params``, the clipping
    ratios {(leaf path, stacked index): [..., in/group, out]}, report {"alpha": ...}); ``quantize`` packs them."""
    lay = _host_layers(params)
    ratios: dict[tuple, np.ndarray] = {}
    report = {"alpha": {}}
    for i, path, idx in layer_slots(cfg):
        _awq_layer(cfg, calib, lay, path, idx, i, bits, group, grid, clip, ratios, report)
    return {**params, "layers": jax.tree.map(jnp.asarray, lay)}, ratios, report


def _awq_layer(cfg, calib, lay, path, idx, i, bits, group, grid, clip, ratios, report) -> None:
    """AWQ on global layer i, whose weights are ``lay[path...][name][idx]`` (host arrays, changed in place)."""
    d = lay
    for k in path:
        d = d[k]
    moe = "router" in d
    inv = {}  # linear name -> the scale its input is divided by (1 where none was folded)

    def scaled(part, key, names, expert=None):
        """Search s for the linears ``names`` (of ``expert``) reading calib[key]'s inputs; scale their rows."""
        x = _inputs(calib, key, expert)
        if expert is not None and not _has_rows(calib, key, expert):  # no calibration token: s = 1
            return np.ones(d[names[0]].shape[-2])
        mean_abs = calib[key]["mean_abs"] if expert is None else calib[key]["mean_abs"][expert]
        where = idx if expert is None else (*idx, expert)
        alpha, s = search(x, [d[n][where] for n in names], mean_abs, bits=bits, group=group, grid=grid)
        report["alpha"][f"layer{i}/{part}" + ("" if expert is None else f"/expert{expert}")] = alpha
        for n in names:
            d[n][where] = (d[n][where] * s[:, None]).astype(np.float32)
        return s

    s = scaled("qkv", f"layer{i}/wq", ("wq", "wk", "wv"))
    d["attn_norm"][idx] = (d["attn_norm"][idx] / s).astype(np.float32)
    inv.update(wq=s, wk=s, wv=s)
    if cfg.n_heads == cfg.n_kv_heads:  # o's column j is v's column j
        s = scaled("o", f"layer{i}/wo", ("wo",))
        d["wv"][idx] = (d["wv"][idx] / s[None, :]).astype(np.float32)
        inv["wo"] = s
    if not moe:
        s = scaled("gate_up", f"layer{i}/w_gate", ("w_gate", "w_up"))
        d["mlp_norm"][idx] = (d["mlp_norm"][idx] / s).astype(np.float32)
        inv.update(w_gate=s, w_up=s)
        s = scaled("down", f"layer{i}/w_down", ("w_down",))
        d["w_up"][idx] = (d["w_up"][idx] / s[None, :]).astype(np.float32)
        inv["w_down"] = s
    else:  # one scale for every expert's W_gate, W_up (and the router) from the layer's MLP input
        x = _inputs(calib, f"layer{i}/router")
        ws = [d[n][idx][e] for n in ("w_gate", "w_up") for e in range(cfg.num_experts)]
        alpha, s = search(x, ws, calib[f"layer{i}/router"]["mean_abs"], bits=bits, group=group, grid=grid)
        report["alpha"][f"layer{i}/gate_up"] = alpha
        for n in ("w_gate", "w_up"):
            d[n][idx] = (d[n][idx] * s[None, :, None]).astype(np.float32)
        d["router"][idx] = (d["router"][idx] * s[:, None]).astype(np.float32)
        d["mlp_norm"][idx] = (d["mlp_norm"][idx] / s).astype(np.float32)
        inv.update(w_gate=s, w_up=s)
        downs = []
        for e in range(cfg.num_experts):
            s_e = scaled("down", f"layer{i}/w_down", ("w_down",), expert=e)
            d["w_up"][(*idx, e)] = (d["w_up"][idx][e] / s_e[None, :]).astype(np.float32)
            downs.append(s_e)
        inv["w_down"] = np.stack(downs)
    if not clip:
        return
    for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        key = f"layer{i}/" + {"wk": "wq", "wv": "wq", "w_up": "w_gate"}.get(n, n)
        w = d[n][idx]
        s = inv.get(n, 1.0)
        if moe and n in ("w_gate", "w_up", "w_down"):
            r = np.ones((cfg.num_experts, w.shape[-2] // group, w.shape[-1]), np.float32)
            for e in range(cfg.num_experts):
                x = _inputs(calib, key, e)
                if _has_rows(calib, key, e):
                    x = x / (s[e] if n == "w_down" else s)
                    r[e] = np.asarray(clip_ratios(jnp.asarray(x, jnp.float32), jnp.asarray(w[e]), bits=bits,
                                                  group=group, grid=grid))
        else:
            x = _inputs(calib, key) / s
            r = np.asarray(clip_ratios(jnp.asarray(x, jnp.float32), jnp.asarray(w), bits=bits, group=group, grid=grid))
        ratios[("/".join(("layers", *path, n)), idx)] = r


# ----------------------------------------------------------------------------- GPTQ (baseline)

def gptq_levels(w: np.ndarray, x: np.ndarray, *, bits: int, group: int, damp: float = 0.01):
    """GPTQ (Frantar et al. 2022, alg. 1) for w [in, out] on inputs x [n, in], float64: input channels are
    quantized in order, each one's error spread over the channels not yet quantized through the upper
    Cholesky factor U of H^-1, H = 2 x^T x + damp mean(diag) I:

        q_i = Q(w_i),   W_{j>i} -= U_{i,j} (w_i - q_i) / U_{i,i}

    with the group's scale and zero taken from the (updated) weights when its first channel is reached.
    Returns (levels uint8 [in, out], scale [in/group, out], zero [in/group, out])."""
    w = np.array(w, np.float64)
    x = np.asarray(x, np.float64)
    n_in, out = w.shape
    h = 2.0 * x.T @ x / max(x.shape[0], 1)
    dead = np.diag(h) == 0  # channels no calibration input reaches (GPTQ zeroes them)
    if dead.all():  # no input at all (an expert no calibration token reached): plain RTN
        h, dead = np.eye(n_in), np.zeros(n_in, bool)
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(n_in)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    levels = np.zeros((n_in, out), np.uint8)
    scales = np.zeros((n_in // group, out))
    zeros = np.zeros((n_in // group, out))
    top = 2 ** bits - 1
    for i in range(n_in):
        g = i // group
        if i % group == 0:
            block = w[i:i + group]
            hi, lo = np.maximum(block.max(0), 0.0), np.minimum(block.min(0), 0.0)
            scales[g] = np.maximum(hi - lo, 1e-8) / top
            zeros[g] = np.clip(np.round(-lo / scales[g]), 0, top)
        q = np.clip(np.round(w[i] / scales[g]) + zeros[g], 0, top)
        levels[i] = q
        err = (w[i] - (q - zeros[g]) * scales[g]) / u[i, i]
        w[i + 1:] -= np.outer(u[i, i + 1:], err)
    return levels, scales, zeros


def from_levels(levels, scale, zero, bits: int, group: int) -> Int4:
    """``Int4`` from integer levels [..., in, out] and per-group scale, zero [..., in/group, out]."""
    per = _per_word(np.shape(levels)[-2])
    return Int4(quant.pack_nibbles(jnp.asarray(levels, jnp.uint8), np.ndim(levels) - 2, per),
                jnp.asarray(scale, jnp.float16), jnp.asarray(zero, jnp.float16), bits, group)


def gptq_model(params: dict, axes: dict, cfg, calib: dict, *, bits: int = 4, group: int = 128) -> tuple[dict, dict]:
    """Every block projection by ``gptq_levels`` on its calibration inputs (of the float model: each layer is
    quantized on its own, not on the outputs of the quantized layers before it) -> (params, axes)."""
    from models.smoothquant import global_ids

    def make(path, w, names):
        name = path.rsplit("/", 1)[-1]
        experts = "experts" in names
        stack = w.shape[:-2 - experts]
        w = np.asarray(w, np.float32)
        levels = np.zeros(w.shape, np.uint8)
        scale = np.zeros((*w.shape[:-2], w.shape[-2] // group, w.shape[-1]))
        zero = np.zeros_like(scale)
        for pos, i in np.ndenumerate(global_ids(path, cfg, stack)):
            key = f"layer{i}/{name}"
            for e in range(w.shape[len(stack)] if experts else 1):
                where = (*pos, e) if experts else pos
                x = _inputs(calib, key, e if experts else None)
                levels[where], scale[where], zero[where] = gptq_levels(w[where], x, bits=bits, group=group)
        return from_levels(levels, scale, zero, bits, group), Int4(tuple(names), tuple(names), tuple(names), bits,
                                                                   group)

    return weights.wrap(params, axes, make, is_block_linear)
