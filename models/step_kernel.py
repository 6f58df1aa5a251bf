"""Mamba's generation kernels (Pallas, Triton): the one-token decoding step's selective state update and conv,
and the prompt's (prefill's) conv.

For one layer l of the stacked recurrent state h [layers, b, E, N] (float32, or a 16-bit float: computed in float32,
stored rounded) and one token per row:

    dt   = softplus(dt_low W_dt + dt_bias)                (dt = 0 where ``live`` is 0: a padding token)
    h'   = keep exp(dt A) * h[l] + dt B x                 (keep = 0 zeroes the state first: a segment start)
    y    = (C . h' + D x) silu(z)                         (Gu & Dao 2023, eq. 2a-2b with ZOH for A, Euler for B)

x, z [b, E]; dt_low [b, R], B, C [b, N] as x_proj wrote them (one [b, R + 2N] array, read in place);
W_dt [R, E] (dt_proj: its matmul is done in the kernel); dt_bias, D [E]; A [E, N] (negative); keep,
live [b]. One program per (block of rows, block of channels) reads its h block once, computes in
float32 and writes h' once, into the same buffer (``input_output_aliases``: the whole stacked
state is the kernel's operand and result, nothing is sliced or copied around the call; the layer
index is a runtime operand, so all layers share one compiled kernel). ``interpret=True`` runs the
same kernel on CPU (tests).

``step_reference`` is the same update in plain XLA (the reference of the tests and the benchmark).
``conv_step`` is the token's causal depthwise conv and silu (``mamba_ops.causal_conv`` for one token),
shifting the layer's slot of the stacked conv window [layers, b, d_conv - 1, E] in place the same way.

For a prompt (``mamba._layer`` with a cache and more than one token), ``prefill_conv`` computes the conv
and its silu as one kernel where XLA read each shifted tap through its own selects; with dt's kernel
(``models/dt_kernel.py``) it took a 64 x 2048 prompt of the 370M config on an H200 from 400 to 359 ms.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from models.flash_kernel import F32, LOG2E, block_size, compiler_params, resolve_interpret, softplus


def step_reference(h, x, z, dbc, dt_proj, dt_bias, A, D, keep=None, live=None):
    """The update in XLA, float32: (y [b, E] float32, h' [b, E, N] float32) for one layer's h [b, E, N]."""
    f32 = lambda a: a.astype(F32)  # noqa: E731
    R, N = dt_proj.shape[0], A.shape[-1]
    dt_low, B, C = (f32(dbc[:, a:a + n]) for a, n in ((0, R), (R, N), (R + N, N)))
    dt = softplus(dt_low @ f32(dt_proj) + f32(dt_bias), False)
    if live is not None:
        dt = dt * f32(live)[:, None]
    decay = jnp.exp(dt[..., None] * f32(A))
    if keep is not None:
        decay = decay * f32(keep)[:, None, None]
    h = decay * f32(h) + (dt * f32(x))[..., None] * B[:, None, :]
    y = jnp.einsum("ben,bn->be", h, C) + f32(D) * f32(x)
    return y * jax.nn.silu(f32(z)), h


def _state_block(layer_ref, rb, be):
    """The index of this program's block of the stacked state [layers, b, E, N]: layer ``layer_ref[0]`` (a
    runtime value, so every layer runs the same compiled kernel), rows i rb.., channels j be.."""
    i, j = pl.program_id(0), pl.program_id(1)
    return layer_ref[0], pl.ds(pl.multiple_of(i * rb, rb), rb), pl.ds(pl.multiple_of(j * be, be), be)


def _kernel(layer_ref, h_ref, x_ref, z_ref, lo_ref, B_ref, C_ref, W_ref, bias_ref, A_ref, D_ref, keep_ref, live_ref,
            y_ref, h_out_ref, *, rb, be):
    """One (block of rb rows, block of be channels): h [rb, be, N] of the whole state; x, z [rb, be]; dt_low [rb, R];
    B, C [rb, N]; W_dt [R, be]; bias, D [be]; A [be, N]; keep, live [rb] -> y [rb, be] (x's dtype), h' in place."""
    layer, rows, chans = _state_block(layer_ref, rb, be)
    at = (layer, rows, chans, slice(None))
    x = x_ref[...].astype(F32)
    dt_low, W = lo_ref[...].astype(F32), W_ref[...].astype(F32)
    dt = jnp.sum(dt_low[:, :, None] * W[None, :, :], axis=1) + bias_ref[...].astype(F32)[None, :]  # [rb, be]
    dt = softplus(dt, False) * live_ref[...].astype(F32)[:, None]
    A2 = A_ref[...].astype(F32) * LOG2E
    decay = jnp.exp2(dt[:, :, None] * A2[None]) * keep_ref[...].astype(F32)[:, None, None]
    B, C = B_ref[...].astype(F32), C_ref[...].astype(F32)
    h = decay * h_ref[at].astype(F32) + (dt * x)[:, :, None] * B[:, None, :]
    h_out_ref[at] = h.astype(h_out_ref.dtype)
    y = jnp.sum(h * C[:, None, :], axis=2) + D_ref[...].astype(F32)[None, :] * x
    z = z_ref[...].astype(F32)
    y_ref[...] = (y * z / (1.0 + jnp.exp(-z))).astype(y_ref.dtype)


@functools.lru_cache(maxsize=None)
def _call(shape, R: int, cols: tuple, z_col: int, rb: int, be: int, y_dtype, num_warps: int, interpret: bool,
          h_dtype=F32):
    """cols: the block-column index of dt_low, B and C in their arrays (blocks of R, N, N columns); z_col: the
    first block column of z in its array."""
    L, b, E, N = shape
    rows_e = pl.BlockSpec((rb, be), lambda i, j: (i, j))
    z_spec = pl.BlockSpec((rb, be), lambda i, j: (i, j + z_col))
    chan = pl.BlockSpec((be,), lambda i, j: (j,))
    rows = pl.BlockSpec((rb,), lambda i, j: (i,))
    state = pl.BlockSpec()  # the whole stacked state: the kernel indexes its layer and block itself
    in_specs = [pl.BlockSpec((1,), lambda i, j: (0,)), state, rows_e, z_spec,
                pl.BlockSpec((rb, R), lambda i, j: (i, cols[0])),
                pl.BlockSpec((rb, N), lambda i, j: (i, cols[1])), pl.BlockSpec((rb, N), lambda i, j: (i, cols[2])),
                pl.BlockSpec((R, be), lambda i, j: (0, j)), chan, pl.BlockSpec((be, N), lambda i, j: (j, 0)), chan,
                rows, rows]
    return pl.pallas_call(
        functools.partial(_kernel, rb=rb, be=be),
        out_shape=[jax.ShapeDtypeStruct((b, E), y_dtype), jax.ShapeDtypeStruct(shape, h_dtype)],
        grid=(b // rb, E // be), in_specs=in_specs, out_specs=[rows_e, state], input_output_aliases={1: 1},
        interpret=interpret, compiler_params=compiler_params(interpret, num_warps, 3),
        name="mamba_step")


# (rows, warps) a program by the state's dtype. The 16-bit states' come from a sweep on an H200 at the 370M config's
# batch-64 shapes (``bench_mamba_step``): 7.5 us a layer against 8.8 with (1, 2); the model's step 1.33-1.34 ms
# against 1.39-1.40.
STATE_TILES = {jnp.dtype(jnp.float32): (1, 2), jnp.dtype(jnp.bfloat16): (4, 4), jnp.dtype(jnp.float16): (4, 4)}


def selective_step(h_all, layer: int, x, z, dbc, dt_proj, dt_bias, A, D, keep=None, live=None, *,
                   block_b: int | None = None, block_e: int = 64, num_warps: int | None = None, interpret=None):
    """The fused step for layer ``layer`` (an int or int32 scalar, read at run time) of h_all [layers, b, E, N]
    (float32, bfloat16 or float16; the update in float32, h' rounded to h_all's dtype).

    x [b, E]; z [b, E], or [b, 2E] to read z from its second half (in_xz's output, in place);
    dbc [b, R + 2N]: x_proj's output (dt_low, B, C side by side; read in place when R is a multiple of
    N, else sliced first); dt_proj [R, E]; dt_bias, D [E]; A [E, N]; keep, live [b] (None:
    ones). Returns (y [b, E] in x's dtype, h_all with layer ``layer`` replaced by h'); h_all's buffer
    is updated in place when the caller no longer needs the old value (under jit: a donated or
    intermediate array). ``block_b`` rows and ``block_e`` channels per program (each the largest
    power of 2 dividing b, E up to that) and ``num_warps``; by default 1 row and 2 warps for a float32 state, 4 and
    4 for a 16-bit one (``STATE_TILES``). On a GPU, R and N must be powers of 2 (Triton blocks).
    ``interpret`` (default: not on a GPU) runs the kernel in the Pallas interpreter.
    """
    interpret = resolve_interpret(interpret)
    L, b, E, N = h_all.shape
    R = dt_proj.shape[0]
    if jnp.dtype(h_all.dtype) not in STATE_TILES:
        raise ValueError(f"the recurrent state is {h_all.dtype}; it must be float32, bfloat16 or float16.")
    if isinstance(layer, int) and not 0 <= layer < L:
        raise ValueError(f"layer is {layer}; the state has {L} layers.")
    if dbc.shape != (b, R + 2 * N):
        raise ValueError(f"dbc is {dbc.shape}; it must be [batch, dt_rank + 2 d_state] = {(b, R + 2 * N)}.")
    if R % N == 0:  # dt_low, B, C read from dbc where they lie
        parts, cols = (dbc, dbc, dbc), (0, R // N, R // N + 1)
    else:
        parts, cols = (dbc[:, :R], dbc[:, R:R + N], dbc[:, R + N:]), (0, 0, 0)
    ones = jnp.ones((b,), F32)
    keep, live = (ones if v is None else v.astype(F32) for v in (keep, live))
    if z.shape not in ((b, E), (b, 2 * E)):
        raise ValueError(f"z is {z.shape}; it must be [batch, E] or [batch, 2E] (in_xz's output) with E = {E}.")
    rows, warps = STATE_TILES[jnp.dtype(h_all.dtype)]
    block_b, num_warps = block_b or rows, num_warps or warps
    be = block_size(E, block_e)
    call = _call((L, b, E, N), R, cols, (z.shape[1] - E) // be, block_size(b, block_b), be, jnp.dtype(x.dtype),
                 int(num_warps), bool(interpret), jnp.dtype(h_all.dtype))
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    return call(layer, h_all, x, z, *parts, dt_proj, dt_bias, A, D, keep, live)


def _conv_kernel(*refs, K, has_bias, rb, be):
    """One (block of rb rows, block of be channels): window [rb, K-1, be] of the whole stacked window; x [rb, be];
    w [K, be]; bias [be]?; keep [rb] -> silu(conv) [rb, be] (x's dtype), the window shifted by x, in place."""
    layer_ref, win_ref, x_ref, w_ref, *refs = refs
    bias_ref = refs.pop(0) if has_bias else None
    keep_ref, live_ref, y_ref, win_out_ref = refs
    layer, rows, chans = _state_block(layer_ref, rb, be)
    keep = keep_ref[...].astype(F32)[:, None]
    x = x_ref[...]
    x = x * live_ref[...].astype(x.dtype)[:, None]  # a padding token is a zero input
    taps = [win_ref[layer, rows, k, chans] for k in range(K - 1)] + [x]
    taps = [t * keep.astype(t.dtype) for t in taps[:-1]] + [x]  # a segment start: the window is zeros
    out = jnp.zeros(x.shape, F32)
    for k in range(K):
        out = out + taps[k].astype(F32) * w_ref[k, :].astype(F32)[None, :]
    if has_bias:
        out = out + bias_ref[...].astype(F32)[None, :]
    for k in range(K - 1):
        win_out_ref[layer, rows, k, chans] = taps[k + 1].astype(win_out_ref.dtype)
    y_ref[...] = (out / (1.0 + jnp.exp(-out))).astype(y_ref.dtype)


@functools.lru_cache(maxsize=None)
def _conv_call(shape, has_bias: bool, rb: int, be: int, y_dtype, num_warps: int, interpret: bool):
    L, b, Km1, E = shape
    rows_e = pl.BlockSpec((rb, be), lambda i, j: (i, j))
    window = pl.BlockSpec()  # the whole stacked window, indexed in the kernel
    in_specs = [pl.BlockSpec((1,), lambda i, j: (0,)), window, rows_e, pl.BlockSpec((Km1 + 1, be), lambda i, j: (0, j))]
    in_specs += [pl.BlockSpec((be,), lambda i, j: (j,))] * has_bias + [pl.BlockSpec((rb,), lambda i, j: (i,))] * 2
    return pl.pallas_call(
        functools.partial(_conv_kernel, K=Km1 + 1, has_bias=has_bias, rb=rb, be=be),
        out_shape=[jax.ShapeDtypeStruct((b, E), y_dtype), jax.ShapeDtypeStruct(shape, jnp.dtype(y_dtype))],
        grid=(b // rb, E // be), in_specs=in_specs, out_specs=[rows_e, window], input_output_aliases={1: 1},
        interpret=interpret, compiler_params=compiler_params(interpret, num_warps, 3),
        name="mamba_conv_step")


def conv_step(window_all, layer: int, x, w, bias=None, keep=None, live=None, *, block_b: int = 4,
              block_e: int = 128, num_warps: int = 4, interpret=None):
    """One token of the causal depthwise conv and its silu for layer ``layer`` (an int or int32 scalar), in place.

    window_all [layers, b, K-1, E] (the last K-1 inputs of each layer, in x's dtype); x [b, E] or
    [b, 2E] (the new input: its first E columns, so in_xz's output is read in place); w [K, E]; bias
    [E] or None; keep [b] (0: a segment start, the window counts as zeros); live [b] (0: a padding
    token, a zero input); None: ones. out = bias + sum_k w[k] tap_k over the taps (window..., x), float32.
    Returns (silu(out) [b, E] in x's dtype, window_all with layer ``layer``'s window shifted by x:
    ``mamba_ops.causal_conv``'s buffer).
    """
    interpret = resolve_interpret(interpret)
    L, b, Km1, E = window_all.shape
    if window_all.dtype != x.dtype:
        raise ValueError(f"the conv window is {window_all.dtype} and x {x.dtype}; they must match.")
    if x.shape not in ((b, E), (b, 2 * E)):
        raise ValueError(f"x is {x.shape}; it must be [batch, E] or [batch, 2E] (in_xz's output) with E = {E}.")
    keep, live = (jnp.ones((b,), F32) if v is None else v.astype(F32) for v in (keep, live))
    call = _conv_call((L, b, Km1, E), bias is not None, block_size(b, block_b), block_size(E, block_e),
                      jnp.dtype(x.dtype), int(num_warps), bool(interpret))
    layer = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    return call(layer, window_all, x, w, *([] if bias is None else [bias]), keep, live)


def _prefill_conv_kernel(*refs, K, has_bias, bt, be):
    """One (row, block of bt positions, block of be channels): out[t] = silu(bias + sum_k w[k] x[t-K+1+k]) over the
    taps whose code equals run[t]. Taps before position 0 come from the head (the cached window, then x)."""
    x_ref, xh_ref, code_ref, ch_ref, run_ref, w_ref, *refs = refs
    bias_ref = refs.pop(0) if has_bias else None
    (o_ref,) = refs
    bi, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    t0 = i * bt
    chans = pl.ds(pl.multiple_of(j * be, be), be)
    first = jnp.full((bt,), i == 0)
    run = run_ref[bi, pl.ds(pl.multiple_of(t0, bt), bt)]
    acc = jnp.zeros((bt, be), F32)
    for k in range(K):
        rows = pl.ds(jnp.maximum(t0 - (K - 1) + k, 0), bt)  # block 0 reads the head instead (masked: never read)
        x = (plgpu.load(x_ref.at[bi, rows, chans], mask=~first[:, None], other=0)
             + plgpu.load(xh_ref.at[bi, pl.ds(k, bt), chans], mask=first[:, None], other=0))
        code = (plgpu.load(code_ref.at[bi, rows], mask=~first, other=0)
                + plgpu.load(ch_ref.at[bi, pl.ds(k, bt)], mask=first, other=0))
        acc = acc + jnp.where((code == run)[:, None], x.astype(F32) * w_ref[k, chans].astype(F32)[None, :], 0.0)
    if has_bias:
        acc = acc + bias_ref[chans].astype(F32)[None, :]
    o_ref[...] = (acc / (1.0 + jnp.exp(-acc))).astype(o_ref.dtype)


@functools.lru_cache(maxsize=None)
def _prefill_conv_call(b: int, s: int, E: int, K: int, has_bias: bool, bt: int, be: int, dtype, num_warps: int,
                       interpret: bool):
    whole = pl.BlockSpec()  # the kernel indexes rows, positions and channels itself
    return pl.pallas_call(
        functools.partial(_prefill_conv_kernel, K=K, has_bias=has_bias, bt=bt, be=be),
        out_shape=jax.ShapeDtypeStruct((b, s, E), dtype), grid=(b, s // bt, E // be),
        in_specs=[whole] * (6 + has_bias), out_specs=pl.BlockSpec((None, bt, be), lambda r, i, j: (r, i, j)),
        interpret=interpret, compiler_params=compiler_params(interpret, num_warps, 3),
        name="mamba_prefill_conv")


def prefill_conv_takes(s: int, E: int) -> bool:
    """Whether ``prefill_conv`` takes a prompt of s positions and E channels: both multiples of 16."""
    return s % 16 == 0 and E % 16 == 0


def prefill_conv(x, w, bias=None, run=None, live=None, buffer=None, *, block_t: int = 32, block_e: int = 128,
                 num_warps: int = 4, interpret=None):
    """silu(``mamba_ops.causal_conv``(x * live, w, bias, run=run, buffer=buffer)) for a prompt, in one kernel.

    x [b, s, E] or [b, s, 2E] (its first E channels: in_xz's output, read in place); w [K, E]; bias [E] or
    None; run [b, s] int (``mamba_ops.segment_info``; None: zeros); live [b, s] (0: a padding token, a zero
    input; None: ones); buffer [b, K-1, E] (the cached inputs before x, run 0; None: zeros). Returns [b, s,
    E] in x's dtype, float32 inside. XLA's fusion of the same sum read each shifted tap with its own
    selects: 1.05 ms at a 64 x 2048 prompt of the 370M config on an H200, against this kernel's 0.60 (the
    default tiles, the fastest of seven). Forward only: as ``conv_silu``'s forward in training it gained
    nothing (``experiments/BENCHMARKS.md``). The new window is ``mamba_ops.conv_window``'s. Blocks of
    ``block_t`` positions and ``block_e`` channels (the largest powers of 2 dividing s and E up to them).
    ``interpret`` (default: not on a GPU) runs the Pallas interpreter."""
    b, s, E = x.shape[0], x.shape[1], w.shape[1]
    K = w.shape[0]
    if x.shape[2] not in (E, 2 * E) or not prefill_conv_takes(s, E):
        raise ValueError(f"prefill_conv takes x [b, s, E or 2E] with s and E multiples of 16; got x {x.shape}, "
                         f"w {w.shape}.")
    bt, be = block_size(s, block_t), block_size(E, block_e)
    if K - 1 > bt:
        raise ValueError(f"the conv has {K} taps; prefill_conv takes at most {bt + 1} with blocks of {bt} positions.")
    interpret = resolve_interpret(interpret)
    run = jnp.zeros((b, s), jnp.int32) if run is None else run.astype(jnp.int32)
    code = run if live is None else jnp.where(live.astype(bool), run, -1)  # a padding input matches no output
    buffer = jnp.zeros((b, K - 1, E), x.dtype) if buffer is None else buffer.astype(x.dtype)
    head = jnp.concatenate([buffer, x[:, :bt, :E]], axis=1)  # positions -(K-1) .. bt-1, for the first block
    code_head = jnp.concatenate([jnp.zeros((b, K - 1), jnp.int32), code[:, :bt]], axis=1)
    call = _prefill_conv_call(b, s, E, K, bias is not None, bt, be, jnp.dtype(x.dtype), int(num_warps), interpret)
    return call(x, head, code, code_head, run, w, *([] if bias is None else [bias]))
