"""Layer math shared by every model family: projections, norms, rotary embeddings, MLPs.

All functions are pure and work on any leading batch shape. Weights are stored in
``param_dtype`` (float32 by default) and cast to the activations' compute dtype at use.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def linear(w, x: jax.Array, out_dtype=None) -> jax.Array:
    """y = x @ w for x [..., in] and w [in, out] -> [..., out].

    The one projection every model uses. A dense ``w`` is an array; compressed
    weights (int8, packed int4, NF4 + LoRA) are pytree objects with a
    ``matmul(x, out_dtype)`` method, so compression swaps weights, not model code.
    ``out_dtype`` asks for a wider result (float32 logits from bf16 inputs) at no
    extra matmul cost.
    """
    if isinstance(w, (jax.Array, np.ndarray)):
        if x.size == x.shape[-1] and _on_gpu():
            return _vector_times_matrix(x, w.astype(x.dtype), out_dtype)
        return jnp.dot(x, w.astype(x.dtype), preferred_element_type=out_dtype).astype(out_dtype or x.dtype)
    return w.matmul(x, out_dtype)


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


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
    return linear(p["w_down"], jax.nn.silu(linear(p["w_gate"], x)) * linear(p["w_up"], x))


def embed_lookup(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
    """Rows of table [vocab, d] for integer tokens [...] -> [..., d] in ``dtype``."""
    return jnp.take(table, tokens, axis=0).astype(dtype)


def normal_init(rng, shape, fan_in: int, dtype) -> jax.Array:
    """N(0, 1/fan_in) weights: keeps activations O(1) and attention far from uniform."""
    return (jax.random.normal(rng, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)
