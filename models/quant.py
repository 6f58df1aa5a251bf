"""Shared pieces of post-training quantization: calibration through ``models.capture``, integer
quantizers, the int8 x int8 -> int32 product, nibble packing and the memory report.

Calibration (SmoothQuant sec. 3, AWQ sec. 3.2) runs the model over calibration token rows and keeps,
for the input of every projection ``layers.linear(..., name=...)`` (keys "layer<i>/<name>", Switch
experts per expert), max |x_j| and mean |x_j| per input channel j over every calibration token, and
optionally a sample of input rows (AWQ's search).

Quantizers (round to nearest, ties to even as ``jnp.round``):

    symmetric, b bits:   q = clip(round(x / s), -(2^(b-1) - 1), 2^(b-1) - 1),   s = max|x| / (2^(b-1) - 1)
    asymmetric, b bits:  q = clip(round(x / s) + z, 0, 2^b - 1),  s = (max - min) / (2^b - 1),  z = round(-min / s)
                         x ~ (q - z) s
"""
from __future__ import annotations

from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from models import capture


# ----------------------------------------------------------------------------- calibration

def calibration_rows(tokens: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """``n`` rows of ``seq_len`` tokens cut from a 1-D token stream (or taken from a [rows, >=seq_len] array).

    Raises ValueError when there are fewer tokens than n x seq_len (calibration data shorter than requested)."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        if tokens.size < n * seq_len:
            raise ValueError(f"calibration data holds {tokens.size} tokens but {n} rows of {seq_len} were requested "
                             f"({n * seq_len}); give more data or lower the number of rows or the sequence length.")
        return tokens[: n * seq_len].reshape(n, seq_len)
    if tokens.shape[0] < n or tokens.shape[1] < seq_len:
        raise ValueError(f"calibration data has shape {tokens.shape} but {n} rows of {seq_len} tokens were requested; "
                         f"give more data or lower the number of rows or the sequence length.")
    return tokens[:n, :seq_len]


def calibrate(model, cfg, params, tokens: np.ndarray, *, batch_size: int = 8, inputs: int = 0, jit=jax.jit) -> dict:
    """Per-linear input statistics over every row of ``tokens`` [n, seq] (int), in batches of ``batch_size``.

    Returns {key: {"absmax": [in] (experts [N, in]), "mean_abs": same, "count": rows covered,
    ["inputs": [k, in], ["segments": [k]]]}} as NumPy float32/int arrays, combined over batches exactly
    (max of maxima, count-weighted means); with ``inputs`` = k, up to k sampled rows per batch, concatenated.
    ``jit``: how the forward is compiled (tests pass one with fast compile options).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[0] < 1:
        raise ValueError(f"calibration tokens have shape {tokens.shape}; give [rows, seq] integers.")

    @jit
    def run(params, toks):
        with capture.taps(linears=True, inputs=inputs) as got:
            model.apply(params, toks, cfg)
        return got.linears

    total: dict[str, dict] = {}
    for start in range(0, tokens.shape[0], batch_size):
        got = jax.device_get(run(params, jnp.asarray(tokens[start:start + batch_size], jnp.int32)))
        for key, st in got.items():
            if key not in total:
                total[key] = {k: np.asarray(v) for k, v in st.items()}
                continue
            t = total[key]
            cnt_old, cnt_new = t["count"], st["count"]
            both = np.maximum(cnt_old + cnt_new, 1.0)
            w_old = (cnt_old / both)[..., None] if np.ndim(cnt_old) else cnt_old / both
            w_new = (cnt_new / both)[..., None] if np.ndim(cnt_new) else cnt_new / both
            t["mean_abs"] = t["mean_abs"] * w_old + st["mean_abs"] * w_new
            t["absmax"] = np.maximum(t["absmax"], st["absmax"])
            t["count"] = cnt_old + cnt_new
            for k in ("inputs", "segments"):
                if k in st:
                    t[k] = np.concatenate([t[k], st[k]])
    return total


# ----------------------------------------------------------------------------- quantizers

def qmax(bits: int) -> int:
    """Largest symmetric integer level, 2^(bits-1) - 1 (127 for int8)."""
    return 2 ** (bits - 1) - 1


def symmetric(x: jax.Array, scale: jax.Array, bits: int = 8) -> jax.Array:
    """int8 levels clip(round(x / scale), -qmax, qmax) (scale broadcast against x; zero scales give 0)."""
    m = qmax(bits)
    safe = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(x.astype(jnp.float32) / safe), -m, m).astype(jnp.int8)


def absmax_scale(x: jax.Array, axis=None, bits: int = 8, keepdims: bool = True) -> jax.Array:
    """Symmetric scale max|x| / qmax over ``axis`` (None: the whole tensor), float32."""
    return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axis, keepdims=keepdims) / qmax(bits)


def int8_matmul(xq: jax.Array, wq: jax.Array, dims: tuple) -> jax.Array:
    """int8 x int8 -> int32 ``dot_general`` (exact: int32 accumulation, |sum| < 2^31 for in < 133k)."""
    return jax.lax.dot_general(xq, wq, dims, preferred_element_type=jnp.int32)


def asymmetric_params(w: jax.Array, bits: int, axis: int, ratio: Any = 1.0) -> tuple[jax.Array, jax.Array]:
    """(scale, zero) of the asymmetric quantizer over ``axis`` (kept), the range [min, max] shrunk by ``ratio``
    (clipping); float32, zero an integer value in [0, 2^bits - 1]."""
    w = w.astype(jnp.float32)
    hi = jnp.maximum(jnp.max(w, axis=axis, keepdims=True), 0.0) * ratio
    lo = jnp.minimum(jnp.min(w, axis=axis, keepdims=True), 0.0) * ratio
    levels = 2 ** bits - 1
    scale = jnp.maximum(hi - lo, 1e-8) / levels
    zero = jnp.clip(jnp.round(-lo / scale), 0, levels)
    return scale, zero


def asymmetric(w: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    """uint8 levels clip(round(w / scale) + zero, 0, 2^bits - 1)."""
    return jnp.clip(jnp.round(w.astype(jnp.float32) / scale) + zero, 0, 2 ** bits - 1).astype(jnp.uint8)


# ----------------------------------------------------------------------------- packing

_WORDS = {2: jnp.uint8, 8: jnp.uint32}  # 4-bit values per word -> word type


def nibbles_per_word(dtype) -> int:
    """4-bit values per packed word of ``dtype``: 2 (uint8) or 8 (uint32)."""
    return 2 * jnp.dtype(dtype).itemsize


def pack_nibbles(q: jax.Array, axis: int, per: int = 2) -> jax.Array:
    """``per`` 4-bit values per word along ``axis`` (length divisible by per): 2 per uint8 byte (byte i =
    q[2i] | q[2i+1] << 4) or 8 per uint32 word (word i = sum_j q[8i+j] << 4j)."""
    if per not in _WORDS:
        raise ValueError(f"per is {per}; pack 2 values per uint8 or 8 per uint32.")
    q = jnp.moveaxis(q.astype(jnp.uint32), axis, 0)
    if q.shape[0] % per:
        raise ValueError(f"cannot pack {q.shape[0]} 4-bit values {per} per word; the axis length must be "
                         f"{'even' if per == 2 else f'a multiple of {per}'}.")
    q = q.reshape(q.shape[0] // per, per, *q.shape[1:])
    packed = q[:, 0] & 0xF
    for j in range(1, per):
        packed = packed | ((q[:, j] & 0xF) << (4 * j))
    return jnp.moveaxis(packed.astype(_WORDS[per]), 0, axis)


def unpack_nibbles(p: jax.Array, axis: int) -> jax.Array:
    """The inverse of ``pack_nibbles`` (2 or 8 values per word by p's dtype, uint8 or uint32): uint8
    [..., n/per, ...] -> uint8 [..., n, ...] along ``axis``. Word i's nibble j is value per i + j, so the values
    are [..., n/per, per, ...] where the words lie (a shift per nibble, nothing transposed), merged."""
    per = nibbles_per_word(p.dtype)
    axis = axis % p.ndim
    shifts = (4 * jnp.arange(per, dtype=p.dtype)).reshape(per, *[1] * (p.ndim - axis - 1))
    q = ((jnp.expand_dims(p, axis + 1) >> shifts) & 0xF).astype(jnp.uint8)  # [..., n/per, per, ...]
    return q.reshape(*p.shape[:axis], per * p.shape[axis], *p.shape[axis + 1:])


# ----------------------------------------------------------------------------- memory

def dequantize_groups(packed: jax.Array, scale: jax.Array, zero: jax.Array, group: int, dtype=jnp.float32,
                      axis: int = -2) -> jax.Array:
    """W = (q - zero) * scale per group of ``group`` inputs, from nibbles packed along the input axis ``axis``
    (``pack_nibbles``) and scale, zero with in/group there: [..., in, out] (axis -2), or W^T [out, in] (axis -1,
    ``awq.Int4.to_out_major``'s), dequantized where the words lie."""
    axis = axis % packed.ndim
    q = unpack_nibbles(packed, axis).astype(jnp.float32)
    n_in = q.shape[axis]
    qg = q.reshape(*q.shape[:axis], n_in // group, group, *q.shape[axis + 1:])
    s, z = (jnp.expand_dims(a.astype(jnp.float32), axis + 1) for a in (scale, zero))
    return ((qg - z) * s).reshape(q.shape).astype(dtype)


def tree_bytes(tree) -> int:
    """Bytes held by every array leaf of ``tree`` (weight types count their parts)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)
                   if hasattr(x, "dtype")))


def memory_report(params, linear_paths: Iterable[str] | None = None) -> dict:
    """{"model_bytes", "linear_bytes", "linear_params", "bytes_per_linear_param"} of ``params``; the linears
    are the leaves (or weight nodes) whose '/'-joined path is in ``linear_paths`` (default: every
    weight-type node and every array under "layers" with 2+ trailing dims named w*)."""
    from models.weights import Weight

    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, Weight))[0]
    chosen = set(linear_paths) if linear_paths is not None else None
    lin_bytes = lin_params = 0
    for path, leaf in flat:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        is_linear = (name in chosen) if chosen is not None else (
            isinstance(leaf, Weight) or (name.startswith("layers/") and name.rsplit("/", 1)[-1].startswith("w")))
        if is_linear:
            lin_bytes += tree_bytes(leaf)
            if isinstance(leaf, Weight):
                lin_params += leaf.num_params() if hasattr(leaf, "num_params") else sum(
                    int(np.prod(x.shape)) for x in jax.tree.leaves(leaf))
            else:
                lin_params += int(np.prod(leaf.shape))
    return {"model_bytes": tree_bytes(params), "linear_bytes": lin_bytes, "linear_params": lin_params,
            "bytes_per_linear_param": lin_bytes / max(lin_params, 1)}
