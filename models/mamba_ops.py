"""Mamba's pieces around the selective scan (``models/mamba.py`` builds its mixer from them): which tokens
start a segment, the causal depthwise conv, the conv with its silu as one differentiable function, and the
gated output (y + D x) silu(z).

``conv_silu`` and ``gate`` have their own backward passes, which keep their [batch, seq, E] gradients in the
inputs' dtype (bf16 in training) and recompute what they need, as the official CUDA kernels do; the train
step compiles with XLA's excess precision off (``models.COMPILER_OPTIONS``), so those roundings stay
bf16 buffers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def segment_info(segment_ids, last_segment=None):
    """Where states reset and which conv taps may mix, for segment_ids [batch, seq] (0 = padding).

    last_segment [batch]: the last non-padding id before these tokens (from a cache; None or 0:
    none). A token starts a new segment when its id is non-zero and differs from the last
    non-padding id before it, so padding is transparent. Returns (start [b, s] bool,
    nonpad [b, s] bool, run [b, s] int32 = number of starts so far (0: continues the cached
    segment), last [b] int32 = the last non-padding id after these tokens).
    """
    b, s = segment_ids.shape
    ids = segment_ids.astype(jnp.int32)
    prev = jnp.zeros((b,), jnp.int32) if last_segment is None else last_segment.astype(jnp.int32)
    nonpad = ids != 0
    where_last = jax.lax.cummax(jnp.where(nonpad, jnp.arange(s, dtype=jnp.int32), -1), axis=1)
    filled = jnp.where(where_last >= 0, jnp.take_along_axis(ids, jnp.maximum(where_last, 0), axis=1),
                       prev[:, None])
    before = jnp.concatenate([prev[:, None], filled[:, :-1]], axis=1)
    start = nonpad & (ids != before)
    return start, nonpad, jnp.cumsum(start, axis=1, dtype=jnp.int32), filled[:, -1]


def _rows(a, pre, start: int, n: int):
    """Rows [start, start + n) of concatenate([pre, a], axis=1) without a copy of a (a slice of each part)."""
    p = pre.shape[1]
    parts = [pre[:, start:min(start + n, p)], a[:, max(0, start - p):max(0, start + n - p)]]
    parts = [q for q in parts if q.shape[1]] or parts[:1]  # d_conv = 1: no buffer rows
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


def causal_conv(x, w, bias=None, *, run=None, buffer=None):
    """Depthwise causal conv: out[t] = bias + sum_k w[k] * x[t - (K-1) + k] over taps of the same run.

    x [batch, seq, E] (zero at padding); w [K, E]; bias [E] or None; run [batch, seq] int
    (``segment_info``; None: one sequence); buffer [batch, K-1, E]: the inputs before x
    (None: zeros; they count as run 0). Accumulates in float32. Returns (out [b, s, E] float32,
    new buffer [b, K-1, E]: ``conv_window``).

    Each tap is the buffer's rows it needs followed by a slice of x, read once by the sum (never one
    [b, K-1+s, E] copy of buffer and x: a prefill would write and re-read its whole input for it).
    """
    b, s, E = x.shape
    K = w.shape[0]
    if buffer is None:
        buffer = jnp.zeros((b, K - 1, E), x.dtype)
    buffer = buffer.astype(x.dtype)
    run_pre = None if run is None else jnp.zeros((b, K - 1), run.dtype)
    out = jnp.zeros((b, s, E), jnp.float32)
    for k in range(K):
        term = _rows(x, buffer, k, s).astype(jnp.float32) * w[k].astype(jnp.float32)
        if run is not None:
            term = jnp.where((_rows(run, run_pre, k, s) == run)[..., None], term, 0.0)
        out = out + term
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out, conv_window(x, buffer, run)


def conv_window(x, buffer, run=None):
    """The inputs the next token's conv reads: the last K-1 rows of concatenate([buffer, x]) [b, K-1, E] in x's
    dtype, zeroed where they belong to an earlier run than x's last token (x [b, s, E], zero at padding;
    buffer [b, K-1, E], run 0; run [b, s] or None as in ``causal_conv``)."""
    b, s, _ = x.shape
    K = buffer.shape[1] + 1
    window = _rows(x, buffer.astype(x.dtype), s, K - 1)
    if run is not None:
        window = jnp.where((_rows(run, jnp.zeros((b, K - 1), run.dtype), s, K - 1) == run[:, -1:])[..., None], window,
                           0)
    return window


@jax.custom_vjp
def conv_silu(x, w, bias, run):
    """silu(causal_conv(x, w, bias, run=run)) [b, s, E] in x's dtype: the mixer's conv with no cached buffer.

    The same function as ``causal_conv`` and ``jax.nn.silu``; its backward recomputes the conv and rounds
    its one [b, s, E] intermediate, the gradient before the silu, to x's dtype (as the official CUDA conv
    keeps it), where autodiff's is float32 because the conv accumulates in float32.
    """
    return jax.nn.silu(causal_conv(x, w, bias, run=run)[0]).astype(x.dtype)


def _conv_silu_fwd(x, w, bias, run):
    return conv_silu(x, w, bias, run), (x, w, bias, run)


def _conv_silu_bwd(res, g):
    """out[t] = sum_k w[k] x[t-K+1+k] over taps of out's run, so dx[p] = sum_k w[k] dpre[p+K-1-k] over the
    outputs of p's run, dw[k] = sum_{b,t} x[t-K+1+k] dpre[t] and dbias = sum dpre."""
    x, w, bias, run = res
    f32 = jnp.float32
    b, s, E = x.shape
    K = w.shape[0]
    pre = causal_conv(x, w, bias, run=run)[0]
    sig = jax.nn.sigmoid(pre)
    dpre = (g.astype(f32) * sig * (1 + pre * (1 - sig))).astype(x.dtype)
    pad = jnp.zeros((b, K - 1, E), x.dtype)
    x_ext, d_ext = jnp.concatenate([pad, x], axis=1), jnp.concatenate([dpre, pad], axis=1)
    if run is not None:  # tap k of output t reads input t-K+1+k only within t's run; inputs before x count as run 0
        run_ext = jnp.concatenate([jnp.zeros((b, K - 1), run.dtype), run], axis=1)
        out_run = jnp.concatenate([run, jnp.full((b, K - 1), -1, run.dtype)], axis=1)  # -1: no output there
    dx = jnp.zeros((b, s, E), f32)
    dw = []
    for k in range(K):
        d_k = d_ext[:, K - 1 - k:K - 1 - k + s].astype(f32)  # dpre of the output that tap k feeds from p
        x_k = x_ext[:, k:k + s].astype(f32)  # the input tap k of output t reads
        if run is not None:
            d_k = jnp.where((out_run[:, K - 1 - k:K - 1 - k + s] == run)[..., None], d_k, 0.0)
            x_k = jnp.where((run_ext[:, k:k + s] == run)[..., None], x_k, 0.0)
        dx = dx + w[k].astype(f32) * d_k
        dw.append(jnp.sum(x_k * dpre.astype(f32), axis=(0, 1)))
    dbias = None if bias is None else jnp.sum(dpre.astype(f32), axis=(0, 1)).astype(bias.dtype)
    return dx.astype(x.dtype), jnp.stack(dw).astype(w.dtype), dbias, None


conv_silu.defvjp(_conv_silu_fwd, _conv_silu_bwd)


@jax.custom_vjp
def gate(y, x, z, D):
    """(y + D x) silu(z) [b, s, E] in z's dtype: the scan's output with its skip term, gated (eq. 2b, then the gate).

    Its backward returns the three [b, s, E] gradients in the inputs' dtypes (bf16 when they are) and sums
    dD in float32, recomputing the gated sum from y, x and z.
    """
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    return ((f32(y) + f32(D) * f32(x)) * jax.nn.silu(f32(z))).astype(z.dtype)


def _gate_fwd(y, x, z, D):
    return gate(y, x, z, D), (y, x, z, D)


def _gate_bwd(res, g):
    y, x, z, D = res
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    g, zf, xf = f32(g), f32(z), f32(x)
    sig = jax.nn.sigmoid(zf)
    dsum = g * zf * sig  # the gradient of y + D x
    dz = g * (f32(y) + f32(D) * xf) * sig * (1 + zf * (1 - sig))
    dD = jnp.sum(dsum * xf, axis=tuple(range(x.ndim - 1)))
    return dsum.astype(y.dtype), (f32(D) * dsum).astype(x.dtype), dz.astype(z.dtype), dD.astype(D.dtype)


gate.defvjp(_gate_fwd, _gate_bwd)
