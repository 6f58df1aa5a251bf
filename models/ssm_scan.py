"""Mamba's selective scan (Gu & Dao 2023, eq. 2a-2b: ZOH decay exp(dt A), Euler input dt B x) in three
methods of one function, ``selective_scan``: 'reference' (a sequential ``lax.scan``, the independent
reference), 'chunked' (XLA: associative scan within chunks, ``lax.scan`` across them) and 'pallas'
(``models/scan_kernel.py``, in ``shard_map`` under a mesh). ``models/mamba.py`` builds its layer on it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from models import scan_kernel
from parallel import sharding
from parallel.sharding import constrain

SCANS = ("chunked", "reference", "pallas")


def _combine(left, right):
    """Compose two affine maps h -> a h + b (left first): (a_l a_r, a_r b_l + b_r)."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _discretize(x, dt, A, B, keep):
    """ZOH decay exp(dt A) (times keep: 0 resets) and Euler input dt B x: each [batch, time, E, N]."""
    decay = jnp.exp(dt[..., None] * A)
    if keep is not None:
        decay = decay * keep[..., None, None]
    return decay, (dt * x)[..., None] * B[..., None, :]


def _scan_reference(x, dt, A, B, C, keep, h0):
    """Sequential scan: one ``lax.scan`` step per token. Returns (C h [b, s, E], h_last)."""

    def step(h, inputs):
        x_t, dt_t, B_t, C_t, keep_t = inputs
        decay, u = _discretize(x_t, dt_t, A, B_t, keep_t)
        h = decay * h + u
        return h, jnp.einsum("ben,bn->be", h, C_t)

    time_major = lambda a: None if a is None else jnp.moveaxis(a, 1, 0)  # noqa: E731
    h, y = jax.lax.scan(step, h0, tuple(map(time_major, (x, dt, B, C, keep))))
    return jnp.moveaxis(y, 0, 1), h


def _scan_chunked(x, dt, A, B, C, keep, h0, chunk_size):
    """Chunked scan: associative within chunks, ``lax.scan`` across them, each chunk rematerialised.

    The length is padded to a multiple of the chunk with dt = 0 (decay 1, no input), which
    leaves the state unchanged, so the final state is exact.
    """
    b, s, E = x.shape
    T = min(chunk_size, s)
    n = -(-s // T)

    def chunks(a, fill=0.0):  # [b, s, ...] -> [n, b, T, ...]
        if a is None:
            return None
        a = jnp.pad(a, [(0, 0), (0, n * T - s)] + [(0, 0)] * (a.ndim - 2), constant_values=fill)
        return jnp.moveaxis(a.reshape(b, n, T, *a.shape[2:]), 1, 0)

    def chunk(h, inputs):
        x_c, dt_c, B_c, C_c, keep_c = inputs
        decay, u = _discretize(x_c, dt_c, A, B_c, keep_c)  # [b, T, E, N]
        u = u.at[:, 0].add(decay[:, 0] * h)  # fold the incoming state into the first step
        decay = constrain(decay, ("batch", None, "inner", "state"))
        u = constrain(u, ("batch", None, "inner", "state"))
        _, hs = jax.lax.associative_scan(_combine, (decay, u), axis=1)
        return hs[:, -1], jnp.einsum("bten,btn->bte", hs, C_c)

    chunk = jax.checkpoint(chunk, prevent_cse=False)
    h, y = jax.lax.scan(chunk, h0, (chunks(x), chunks(dt), chunks(B), chunks(C), chunks(keep, 1.0)))
    return jnp.moveaxis(y, 0, 1).reshape(b, n * T, E)[:, :s], h


def _scan_pallas(x, dt, A, B, C, keep, h0, splits=0, y_dtype=jnp.float32):
    """``scan_kernel.selective_scan_pallas``; under an active mesh in ``shard_map``, each device
    scanning its rows and channels (by the rules for ``batch`` and ``inner``) over the whole
    sequence: the custom calls of the kernels are opaque to XLA's partitioner."""
    def run(x, dt, A, B, C, keep, h0):
        return scan_kernel.selective_scan_pallas(x, dt, A, B, C, keep=keep, h0=h0, seq_splits=int(splits) or None,
                                                 y_dtype=y_dtype)

    rows_inner, rows, state = ("batch", None, "inner"), ("batch", None, None), ("batch", "inner", None)
    in_names = (rows_inner, rows_inner, ("inner", None), rows, rows, ("batch", None), state)
    return sharding.per_device(run, in_names, (rows_inner, state))(x, dt, A, B, C, keep, h0)


def selective_scan(x, dt, A, B, C, D, *, reset=None, h0=None, method: str = "chunked", chunk_size: int = 64,
                   splits: int = 0, y_dtype=jnp.float32):
    """y_t = C_t h_t + D x_t with h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, in float32.

    x, dt: [batch, seq, E] (dt after softplus; dt = 0 leaves the state unchanged); A: [E, N]
    (negative); B, C: [batch, seq, N]; D: [E], or None for y_t = C_t h_t (the caller adds D x);
    reset: [batch, seq] bool, True where the state is zeroed before the token (a segment start), or None;
    h0: [batch, E, N] initial state (None: zeros). ``method`` is 'chunked' (associative scan in chunks
    of ``chunk_size``, any length), 'reference' (sequential) or 'pallas' (``scan_kernel``: x, dt, B, C
    are read in their own dtype; a one-token call, a decoding step, takes the sequential update;
    ``splits``: its sequence split, 0 auto; ``y_dtype``: the dtype it writes C h in, and reads that
    gradient in: bf16 halves that traffic for one more bf16 rounding). Returns
    (y [batch, seq, E] float32, h_last [batch, E, N] float32).
    """
    f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
    keep = None if reset is None else 1.0 - f32(reset)
    skip = (lambda y: y) if D is None else (lambda y: y + f32(D) * f32(x))  # noqa: E731
    if method == "pallas" and x.shape[1] > 1:  # one decoding step: the plain update below, not a padded kernel
        y, h = _scan_pallas(x, dt, A, B, C, keep, h0, splits, y_dtype)
        return skip(f32(y)), h
    x, dt, A, B, C = map(f32, (x, dt, A, B, C))
    b, _, E = x.shape
    h0 = jnp.zeros((b, E, A.shape[-1]), jnp.float32) if h0 is None else f32(h0)
    if method == "reference" or method == "pallas":
        y, h = _scan_reference(x, dt, A, B, C, keep, h0)
    elif method == "chunked":
        y, h = _scan_chunked(x, dt, A, B, C, keep, h0, chunk_size)
    else:
        raise ValueError(f"selective_scan method is {method!r}; use one of {list(SCANS)}.")
    return skip(y), h
