"""Layer math shared by every model family: the one projection ``linear`` (weight types in
``models.weights``), the embedding lookup and LM head (tied or not), norms, rotary embeddings,
MLPs and the remat policies.

All functions are pure and work on any leading batch shape. Weights are stored in
``param_dtype`` (float32 by default) and cast to the activations' compute dtype at use.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import capture, decode_matmul
from models.weights import Dot, Weight
from parallel import sharding
from parallel.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def linear(w, x: jax.Array, out_dtype=None, *, name: str | None = None, transpose: bool = False,
           experts: bool = False, group_sizes: jax.Array | None = None, precision=None) -> jax.Array:
    """y = x @ w: the one projection every model uses (``weights.Dot`` lists the forms).

    dense: x [..., in], w [in, out] -> [..., out]; ``transpose``: w [out, in], y = x @ w.T (a tied LM
    head on the embedding table, never materialising the transpose). ``experts``: x [..., E, C, in],
    w [E, in, out] -> [..., E, C, out] (the Switch capacity buffers). ``group_sizes`` [E]: x [M, in]
    with rows sorted by expert, w [E, in, out] -> [M, out] (the dropless grouped matmul).
    w is an array (cast to x's dtype) or a ``weights.Weight`` with its own matmul, so compression
    and adapters swap weights, not model code. ``out_dtype`` asks for a wider result (float32
    logits from bf16 inputs) at no extra matmul cost. ``name`` (dense form) is the tap name under
    ``capture`` (the input's per-channel statistics, keyed "layer<i>/<name>").
    """
    if name is not None and capture.active():
        capture.linear_input(name, x)
    form = "ragged" if group_sizes is not None else "experts" if experts else "dense"
    dot = Dot(form, transpose, out_dtype, group_sizes, precision)
    if isinstance(w, Weight):
        return w.matmul(x, dot)
    return plain_dot(dot, x, w)


def plain_dot(dot: Dot, x: jax.Array, w: jax.Array) -> jax.Array:
    """``dot`` on a plain array w (cast to x's dtype); the kernels behind ``linear``."""
    out_dtype = dot.out_dtype
    w = w.astype(x.dtype)
    if dot.form == "ragged":
        return grouped_matmul(x, w, dot.group_sizes).astype(out_dtype or x.dtype)
    if dot.form == "experts":
        y = jnp.einsum("...ecd,edf->...ecf", x, w, preferred_element_type=out_dtype, precision=dot.precision)
        return y.astype(out_dtype or x.dtype)
    if dot.transpose:
        w = w.T
    elif decode_kernels() and decode_matmul.takes(x, w):  # a batch-1 step's one row times a wide weight
        return _mixed_dot(x, w, jnp.dtype(out_dtype or x.dtype), dot.precision, True)
    if x.size == x.shape[-1] and _on_gpu():
        return _vector_times_matrix(x, w, out_dtype)
    if out_dtype is not None and jnp.dtype(out_dtype).itemsize > x.dtype.itemsize:
        return _mixed_dot(x, w, jnp.dtype(out_dtype), dot.precision, False)
    return jnp.dot(x, w, preferred_element_type=out_dtype, precision=dot.precision).astype(out_dtype or x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mixed_dot(x, w, out_dtype, precision, kernel: bool):
    """x [..., in] @ w [in, out] -> ``out_dtype`` with float32 accumulation: XLA's product (a wider result:
    float32 logits from bf16 x and w) or, with ``kernel``, ``decode_matmul``'s (one row, read once).

    The backward casts the cotangent to x's dtype first, so its two matmuls run at x's precision
    with float32 accumulation, as mixed-precision training does; JAX's own transpose would multiply
    the float32 cotangent by the upcast operand (two float32 GEMMs the size of the forward's), and has
    no rule for the Pallas kernel.
    """
    if kernel:
        return decode_matmul.decode_matmul(x, w, out_dtype)
    return jnp.dot(x, w, preferred_element_type=out_dtype, precision=precision)


def _mixed_fwd(x, w, out_dtype, precision, kernel):
    return _mixed_dot(x, w, out_dtype, precision, kernel), (x, w)


def _mixed_bwd(out_dtype, precision, kernel, res, g):
    x, w = res
    g = g.astype(x.dtype)
    lead = tuple(range(x.ndim - 1))
    dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32, precision=precision).astype(x.dtype)
    dw = jnp.tensordot(x, g, axes=(lead, lead), preferred_element_type=jnp.float32, precision=precision)
    return dx, dw.astype(w.dtype)


_mixed_dot.defvjp(_mixed_fwd, _mixed_bwd)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K] with rows sorted by group, w [N, K, F], group_sizes [N] (summing to M) -> [M, F].

    Rows of group i are multiplied by w[i]. The one place to swap in a faster GPU kernel.
    """
    return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def decode_kernels() -> bool:
    """Whether ``decode_matmul`` may take a product: on a GPU, without an active mesh (GSPMD cannot split a
    Pallas call)."""
    return _on_gpu() and sharding.active() is None


def _vector_times_matrix(x, w, out_dtype):
    """One row x [..., in] (a batch-1 decoding step) times w [in, out], as a two-row GEMM.

    XLA's GPU compiler rewrites a vector-matrix product whose operands hold under 10M elements
    into a broadcast multiply and a reduce (its dot strength reduction), which for a decoding
    step's projections (W_o: [2048, 2048]) writes and re-reads a product the size of the weight.
    A second, zero row makes it a matrix product again (cuBLAS reads the weight once); the
    optimisation barriers keep the simplifier from slicing the row back off before the dot.
    """
    rows = jax.lax.optimization_barrier(jnp.concatenate([x.reshape(1, -1), jnp.zeros_like(x.reshape(1, -1))]))
    y = jax.lax.optimization_barrier(jnp.dot(rows, w, preferred_element_type=out_dtype))
    return y[0].reshape(*x.shape[:-1], w.shape[-1]).astype(out_dtype or x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * scale, in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), half-split ("rotate_half") layout.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] integers.
    Pair (x_i, x_{i+d/2}) is rotated by angle pos * theta^(-2i/d).
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def swiglu(p: dict, x: jax.Array) -> jax.Array:
    """SwiGLU MLP (Shazeer 2020): W_down (silu(x W_gate) * x W_up). x [..., d] -> [..., d]."""
    hidden = jax.nn.silu(linear(p["w_gate"], x, name="w_gate")) * linear(p["w_up"], x, name="w_up")
    return linear(p["w_down"], hidden, name="w_down")


SCAN_PIECE_STATES = "ssm_piece_states"  # the split selective scan's states before each piece (scan_kernel)
SCAN_RESIDUALS = "ssm_scan_residuals"  # the Pallas scan's output y and its states at chunk starts (scan_kernel)


def _dots_and(*names):
    """Keep matmul outputs and the values named ``names``."""
    return jax.checkpoint_policies.save_from_both_policies(jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                                                           jax.checkpoint_policies.save_only_these_names(*names))


REMAT_POLICIES = {
    "none": None,  # no rematerialisation: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only layer inputs
    # keep matmul outputs (and the split selective scan's states before each piece, [b, P, E, N]: tiny)
    "dots": _dots_and(SCAN_PIECE_STATES),
    # "dots" plus the Pallas selective scan's output and chunk states: the backward runs no forward scan
    # (float32 [b, s / 8, E, N] states a layer: the 370M Mamba at 32768 tokens a step plans 63 GB, "dots" 29)
    "dots_scan": _dots_and(SCAN_PIECE_STATES, SCAN_RESIDUALS),
    "save_qkv_mlp": jax.checkpoint_policies.save_only_these_names("qkv", "mlp_hidden"),
}


def layer_scan(body, carry, xs, unroll: int):
    """``lax.scan(body, carry, xs)`` over the stacked layers, ``unroll`` (``model.layer_unroll``) layers per
    iteration; 0: all, as straight-line code. A loop stores what the backward reads in stacked [layers, ...]
    buffers (XLA copies custom calls' outputs into them) and, without remat, every residual; unrolled, each is
    read where it was written (the 370M Mamba on an H200: remat "dots" 1.01x unrolled; "none" unrolled 1.14x
    "dots" in a loop, and 85 GB where the loop asked for 240)."""
    return jax.lax.scan(body, carry, xs, unroll=unroll or True)


def remat(fn, policy: str, unroll: int):
    """``fn`` under ``jax.checkpoint`` with ``REMAT_POLICIES[policy]`` ("none": as is). In unrolled layers
    (``unroll`` != 1) the recomputation needs its CSE barrier, or XLA merges it with the forward."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=unroll != 1)


def check_layer_unroll(value) -> None:
    """Raise ValueError unless ``model.layer_unroll`` is a non-negative int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"model.layer_unroll is {value!r}; set it to the layers run per iteration of the layer "
                         "scan (1: a loop, 0: all layers unrolled).")


def embed_lookup(table, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of table [vocab, d] (an array or a ``Weight``) for integer tokens [...] -> [..., d] in ``dtype``."""
    if isinstance(table, Weight):
        return table.rows(tokens, dtype)
    return jnp.take(table, tokens, axis=0).astype(dtype)


def embed(params: dict, tokens: jax.Array, dtype) -> jax.Array:
    """tokens [batch, seq] int -> hidden [batch, seq, d] in ``dtype`` from ``params['embed']`` [vocab, d]."""
    # Gather the table over vocab first: a lookup into a vocab-split table would be rematerialised whole.
    table = params["embed"]
    if not isinstance(table, Weight):
        table = constrain(table, (None, "embed"))
    return constrain(embed_lookup(table, tokens, dtype), ("batch", "seq", "embed"))


def lm_head(params: dict, x: jax.Array, eps: float, tie_embeddings: bool) -> jax.Array:
    """Final RMSNorm and LM head: hidden [batch, seq, d] -> float32 logits [batch, seq, vocab].

    The head is ``params['head']`` [d, vocab], or with ``tie_embeddings`` the table [vocab, d] transposed."""
    x = rms_norm(x, params["final_norm"], eps)
    w = params["embed"] if tie_embeddings else params["head"]
    logits = linear(w, x, out_dtype=jnp.float32, transpose=tie_embeddings, name="head")
    return constrain(logits, ("batch", "seq", "vocab"))


def normal_init(rng, shape, fan_in: int, dtype) -> jax.Array:
    """N(0, 1/fan_in) weights: keeps activations O(1) and attention far from uniform."""
    return (jax.random.normal(rng, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)
