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
0.27x of bfloat16 at group 128. Up to 8 rows (decoding) can instead run ``int4_kernel.int4_gemv``, a fused
Pallas kernel that reads the words once and never writes the float weight. For one row, a Transformer layer's
four int4 projections run as the six-kernel layer (``models.transformer.decode_params``,
``Int4.to_out_major``, ``models/decode_matmul.py``).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models import int4_kernel, quant, weights
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
    # packed [out, in/8] and scale, zero [out, in/group]: W^T's layout, batch-1 decoding's (``to_out_major``)
    out_major: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def out_last(self) -> bool:
        """packed, scale and zero all end in the output axis: columns join (decode_params' W_qkv)."""
        return not self.out_major

    def to_out_major(self) -> "Int4":
        """This weight with packed [out, in/8] and scale, zero [out, in/group] (one matrix of uint32 words): each
        output's words are one contiguous row, as ``decode_matmul``'s out-major kernels read them."""
        if self.out_major or self.packed.ndim != 2 or self.packed.dtype != jnp.uint32:
            raise ValueError(f"to_out_major takes one in-major matrix of uint32 words; this weight is packed "
                             f"{self.packed.shape} {self.packed.dtype} (out_major={self.out_major}).")
        return self.replace(packed=self.packed.T, scale=self.scale.T, zero=self.zero.T, out_major=True)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The weight [..., in, out] in ``dtype``."""
        w = quant.dequantize_groups(self.packed, self.scale, self.zero, self.group, dtype,
                                    axis=-1 if self.out_major else -2)
        return w.T if self.out_major else w

    def matmul(self, x, dot: weights.Dot):
        """x times the dequantized weight; with ``kernel`` "pallas" ("interpret": the same kernel on CPU; tile
        options after a colon, see ``with_kernel``) up to ``int4_kernel.GEMV_ROWS`` rows (decoding, dense form) run
        ``int4_kernel.int4_gemv``, which never writes the float weight. Out-major (``to_out_major``; dense form
        only): the product with W^T as the dot's transposed operand, as ``weights.OutMajor``'s."""
        if self.out_major:  # W^T dequantized where its words lie, multiplied as OutMajor's
            wt = quant.dequantize_groups(self.packed, self.scale, self.zero, self.group, x.dtype, axis=-1)
            return weights.OutMajor(wt).matmul(x, dot)
        if (self.kernel and dot.form == "dense" and not dot.transpose and x.ndim and self.packed.ndim == 2
                and self.packed.dtype == jnp.uint32):
            name, opts = int4_kernel.kernel_options(self.kernel)
            rows = x.size // x.shape[-1]
            if int4_kernel.gemv_plan(rows, x.shape[-1], self.packed.shape[-1], self.group, **opts) is not None:
                y = int4_kernel.int4_gemv(x.reshape(rows, -1), self.packed, self.scale, self.zero, group=self.group,
                                          interpret=name == "interpret", **opts)
                return y.reshape(*x.shape[:-1], -1).astype(dot.out_dtype or x.dtype)
        return dot(x, self.dequantize(x.dtype))  # shapes the kernel cannot tile, and more than GEMV_ROWS rows

    def num_params(self) -> int:
        return int(np.prod(self.packed.shape)) * quant.nibbles_per_word(self.packed.dtype)


def with_kernel(params, kernel: str = "pallas", **options):
    """``params`` with every ``Int4`` set to use ``kernel`` ("pallas", or "interpret" on CPU) for up to
    ``int4_kernel.GEMV_ROWS`` rows (decoding); ``options``: tile settings of ``int4_kernel.int4_gemv``
    (block_n=256, splits=8, ...),
    kept in the weight's static ``kernel`` string ("pallas:block_n=256,splits=8")."""
    if options and not kernel:
        raise ValueError(f"int4_gemv options {sorted(options)} need a kernel: 'pallas' (or 'interpret' on CPU).")
    spec = kernel + (":" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) if options else "")
    int4_kernel.kernel_options(spec)  # refuses an unknown option by name
    return jax.tree.map(lambda w: w.replace(kernel=spec) if isinstance(w, Int4) else w, params,
                        is_leaf=lambda w: isinstance(w, Int4))


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
