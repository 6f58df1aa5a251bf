"""Mamba's one-token decoding step of the selective state update as a Pallas (Triton) kernel.

For one layer l of the stacked recurrent state h [layers, b, E, N] float32 and one token per row:

    dt   = softplus(dt_raw + dt_bias)                     (dt = 0 where ``live`` is 0: a padding token)
    h'   = keep exp(dt A) * h[l] + dt B x                 (keep = 0 zeroes the state first: a segment start)
    y    = (C . h' + D x) silu(z)                         (Gu & Dao 2023, eq. 2a-2b with ZOH for A, Euler for B)

x, z, dt_raw [b, E]; dt_bias, D [E]; A [E, N] (negative); B, C [b, N]; keep, live [b]. One
program per (batch row, block of ``block_e`` channels) reads its h block once, computes in
float32 and writes h' once, into the same buffer (``input_output_aliases``: the whole stacked state
is the kernel's operand and result, layer ``l`` chosen by the block index, so nothing is sliced or
copied around the call). ``interpret=True`` runs the same kernel on CPU (tests).

``step_reference`` is the same update in plain XLA, the path off GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32
LOG2E = 1.4426950408889634


def _softplus(v):
    """log(1 + e^v) = max(v, 0) + log(1 + e^-|v|), stable for any v (jax.nn.softplus's value)."""
    return jnp.maximum(v, 0.0) + jnp.log(1.0 + jnp.exp(-jnp.abs(v)))


def step_reference(h, x, z, dt_raw, dt_bias, A, B, C, D, keep=None, live=None):
    """The update in XLA, float32: (y [b, E] float32, h' [b, E, N] float32) for one layer's h [b, E, N]."""
    f32 = lambda a: a.astype(F32)  # noqa: E731
    dt = _softplus(f32(dt_raw) + f32(dt_bias))
    if live is not None:
        dt = dt * f32(live)[:, None]
    decay = jnp.exp(dt[..., None] * f32(A))
    if keep is not None:
        decay = decay * f32(keep)[:, None, None]
    h = decay * f32(h) + (dt * f32(x))[..., None] * f32(B)[:, None, :]
    y = jnp.einsum("ben,bn->be", h, f32(C)) + f32(D) * f32(x)
    return y * jax.nn.silu(f32(z)), h


def _kernel(h_ref, x_ref, z_ref, dt_ref, bias_ref, A_ref, B_ref, C_ref, D_ref, flags_ref, y_ref, h_out_ref):
    """One (batch row, channel block): h [be, N]; x, z, dt [be]; bias, D [be]; A [be, N]; B, C [N]; flags [2]
    (keep, live) -> y [be] (x's dtype), h' [be, N] float32 in place."""
    keep, live = flags_ref[0], flags_ref[1]
    x = x_ref[...].astype(F32)
    dt = _softplus(dt_ref[...].astype(F32) + bias_ref[...].astype(F32)) * live
    decay = jnp.exp2(dt[:, None] * (A_ref[...].astype(F32) * LOG2E)) * keep
    h = decay * h_ref[...] + (dt * x)[:, None] * B_ref[...].astype(F32)[None, :]
    h_out_ref[...] = h
    y = jnp.sum(h * C_ref[...].astype(F32)[None, :], axis=1) + D_ref[...].astype(F32) * x
    z = z_ref[...].astype(F32)
    y_ref[...] = (y * z / (1.0 + jnp.exp(-z))).astype(y_ref.dtype)


@functools.lru_cache(maxsize=None)
def _call(shape, layer: int, be: int, y_dtype, num_warps: int, interpret: bool):
    L, b, E, N = shape
    sq = pl.squeezed
    row_e = pl.BlockSpec((sq, be), lambda i, j: (i, j))
    chan = pl.BlockSpec((be,), lambda i, j: (j,))
    row_n = pl.BlockSpec((sq, N), lambda i, j: (i, 0))
    state = pl.BlockSpec((sq, sq, be, N), lambda i, j: (layer, i, j, 0))
    in_specs = [state, row_e, row_e, row_e, chan, pl.BlockSpec((be, N), lambda i, j: (j, 0)), row_n, row_n, chan,
                pl.BlockSpec((sq, 2), lambda i, j: (i, 0))]
    return pl.pallas_call(
        _kernel, out_shape=[jax.ShapeDtypeStruct((b, E), y_dtype), jax.ShapeDtypeStruct(shape, F32)],
        grid=(b, E // be), in_specs=in_specs, out_specs=[row_e, state], input_output_aliases={0: 1},
        interpret=interpret, compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps),
        name="mamba_step")


def block_size(E: int, block_e: int) -> int:
    """The largest power of 2 that divides E and is at most ``block_e`` (channels per program)."""
    be = 1
    while be * 2 <= block_e and E % (be * 2) == 0:
        be *= 2
    return be


def selective_step(h_all, layer: int, x, z, dt_raw, dt_bias, A, B, C, D, keep=None, live=None, *,
                   block_e: int = 128, num_warps: int = 4, interpret=None):
    """The fused step for layer ``layer`` (static) of h_all [layers, b, E, N] float32.

    Returns (y [b, E] in x's dtype, h_all with layer ``layer`` replaced by h'); h_all's buffer is
    updated in place when the caller no longer needs the old value (under jit: a donated or
    intermediate array). keep, live [b] (None: all ones). ``interpret`` (default: not on a GPU)
    runs the kernel in the Pallas interpreter.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    L, b, E, N = h_all.shape
    if h_all.dtype != F32:
        raise ValueError(f"the recurrent state is {h_all.dtype}; it must be float32.")
    if not 0 <= layer < L:
        raise ValueError(f"layer is {layer}; the state has {L} layers.")
    ones = jnp.ones((b,), F32)
    flags = jnp.stack([ones if keep is None else keep.astype(F32), ones if live is None else live.astype(F32)], 1)
    call = _call((L, b, E, N), int(layer), block_size(E, block_e), jnp.dtype(x.dtype), int(num_warps),
                 bool(interpret))
    y, h_all = call(h_all, x, z, dt_raw, dt_bias, A, B, C, D, flags)
    return y, h_all
