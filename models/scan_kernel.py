"""Mamba's selective scan as Pallas (Triton) kernels for NVIDIA GPUs, forward and backward.

    h_t = keep_t exp(dt_t A) * h_{t-1} + dt_t B_t x_t        h [E, N] float32, h_{-1} = h0
    y_t = C_t . h_t                                           (the D x_t skip is added by the caller)

x, dt [b, s, E]; A [E, N]; B, C [b, s, N]; keep [b, s] (0 zeroes the state before the token) or
None. Inputs keep their dtype in memory (bf16 is fine); all arithmetic is float32. exp(dt A) is one PTX
``ex2.approx.ftz`` (``flash_kernel.exp2``), not libdevice's ``exp2f``, which keeps subnormal results at the cost
of more instructions: these kernels are bound by arithmetic, not memory (the 370M Mamba trained 1.01-1.03x faster).

Forward: one program per (batch row, block of ``block_e`` channels) holds h [block_e, N] in
registers and walks the sequence in chunks of ``chunk`` steps, each chunk unrolled with all its
loads issued first (or, with ``prefetch``, one chunk ahead in the loop carry). Under ``jax.grad``
it also saves h at every chunk start, [b, s / chunk, E, N] float32.

Backward (``custom_vjp``): with g_t = dL/dh_t (total) and a_t = keep_t exp(dt_t A),

    g_t   = gy_t C_t + a_{t+1} g_{t+1}    (g_{s-1} includes dL/dh_last)
    dC_t  = sum_e gy_t h_t                 dB_t = sum_e g_t dt_t x_t
    dx_t  = dt_t sum_n g_t B_t             ddt_t = x_t sum_n g_t B_t + sum_n g_t h_{t-1} a_t A
    dA    = sum_{b,t} g_t h_{t-1} a_t dt_t       dh0 = a_0 g_0

One program per (batch row, channel block) walks the chunks in reverse: it recomputes the
chunk's states from the saved chunk start (kept in registers, ``chunk`` of them), computes
dC on the way forward, then the rest on the way back. dB, dC and dA reduce over channels or
batch: each program writes its partial sums and XLA adds them.

Sequence split (``seq_splits`` P > 1, for rows x channel blocks too few to fill the GPU): each row's
sequence is cut into P contiguous pieces, folded into the batch axis ([b, S] -> [b P, S / P], a free
reshape), so the same kernels run on P times the programs. Forward: (1) each piece but the last from
h = 0, its final state only (no y); (2) in XLA, float32, P - 1 steps over [b, E, N]: the true
state before piece p, h(p) = D(p-1) h(p-1) + local(p-1) from h(0) = h0, with the piece's total decay
D(p) = prod_t a_t = exp(A sum_t dt_t) prod_t keep_t (a reset anywhere in it zeroes it); (3) each
piece again from its true initial state, writing y and (under grad) the chunk-start states, which
are then the unsplit scan's. Backward: (1) an adjoint-only kernel per piece but the first, g_{t-1} =
a_t (g_t + gy_t C_t) from zero after the piece, giving its local dL/dh0; (2) in reverse, the true
adjoint after piece p, g(p) = local(p+1) + D(p+1) g(p+1) from g(P-1) = dL/dh_last; (3) the backward
kernel per piece from the saved true states and g(p). Cost: (P - 1) / P of a forward scan and of an
adjoint pass more (the states are the recurrence's; only D(p) is computed another way, as one exp of
a sum), for P times the programs. The two extra passes have their own tiles (``split_*``).

Lengths that are not a multiple of ``chunk`` (when split, of P times the larger chunk) are padded with dt = 0
(decay 1, no input: the state is unchanged); E is padded to a multiple of ``block_e`` and N to a
power of 2 with lanes that stay zero. ``interpret=True`` runs the same kernels on CPU (tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from models.flash_kernel import F32, LOG2E, exp2, sm_count  # exp(v) = exp2(v LOG2E): one fast instruction
from models.layers import SCAN_PIECE_STATES as PIECE_STATES, SCAN_RESIDUALS as RESIDUALS


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def _fwd_kernel(*refs, T, n, has_keep, save, prefetch, fast, emit_y=True):
    """One (batch row, channel block): refs are x, dt [S, be]; A [be, N]; B, C [S, N]; keep [S]?; h0 [be, N]
    -> y [S, be] (if ``emit_y``; in ``y_dtype``), h_last [be, N] f32, and h at each chunk start [n, be, N] f32
    if ``save``."""
    x_ref, dt_ref, A_ref, B_ref, C_ref, *refs = refs
    keep_ref = refs.pop(0) if has_keep else None
    h0_ref, *refs = refs
    y_ref = refs.pop(0) if emit_y else None
    hl_ref, *refs = refs
    hc_ref = refs[0] if save else None
    A2 = A_ref[...].astype(F32) * LOG2E

    def load(c):  # chunk c's inputs, one tuple per step (static offsets, all issued together)
        t0 = c * T
        return [(x_ref[t0 + k].astype(F32), dt_ref[t0 + k].astype(F32), B_ref[t0 + k].astype(F32),
                 C_ref[t0 + k].astype(F32), keep_ref[t0 + k] if has_keep else None) for k in range(T)]

    def body(c, carry):
        h, rows = carry
        rows, ahead = (rows, load(jnp.minimum(c + 1, n - 1))) if prefetch else (load(c), ())
        if save:
            hc_ref[c] = h
        for k, (x, dt, B, C, keep) in enumerate(rows):
            decay = exp2(dt[:, None] * A2, fast)
            if has_keep:
                decay = decay * keep
            h = decay * h + (dt * x)[:, None] * B[None, :]
            if emit_y:
                y_ref[c * T + k] = jnp.sum(h * C[None, :], axis=1).astype(y_ref.dtype)
        return h, ahead

    h, _ = jax.lax.fori_loop(0, n, body, (h0_ref[...].astype(F32), load(0) if prefetch else ()))
    hl_ref[...] = h


def _bwd_kernel(*refs, T, n, has_keep, prefetch, fast):
    """One (batch row, channel block), chunks in reverse. refs: x, dt [S, be]; A [be, N]; B, C [S, N];
    keep [S]?; hc [n, be, N]; gy [S, be]; g_hlast [be, N] -> dx, ddt [S, be] (in x's and dt's dtypes);
    dA [be, N]; dB, dC [S, N] (this block's partial sums over channels); dh0 [be, N] (float32)."""
    x_ref, dt_ref, A_ref, B_ref, C_ref, *refs = refs
    keep_ref = refs.pop(0) if has_keep else None
    hc_ref, gy_ref, ghl_ref, dx_ref, ddt_ref, dA_ref, dB_ref, dC_ref, dh0_ref = refs
    A = A_ref[...].astype(F32)
    A2 = A * LOG2E

    def load(c):
        t0 = c * T
        rows = [(x_ref[t0 + k].astype(F32), dt_ref[t0 + k].astype(F32), B_ref[t0 + k].astype(F32),
                 C_ref[t0 + k].astype(F32), keep_ref[t0 + k] if has_keep else None, gy_ref[t0 + k].astype(F32))
                for k in range(T)]
        return hc_ref[c], rows

    def decay_of(dt, keep):
        decay = exp2(dt[:, None] * A2, fast)
        return decay * keep if has_keep else decay

    def body(i, carry):
        g, dA, ahead = carry  # g: dL/dh at the end of chunk c from later steps
        c = n - 1 - i
        (h, rows), ahead = (ahead, load(jnp.maximum(c - 1, 0))) if prefetch else (load(c), ())  # h: before chunk c
        before = []  # the state before each step of the chunk
        for k, (x, dt, B, C, keep, gy) in enumerate(rows):
            before.append(h)
            h = decay_of(dt, keep) * h + (dt * x)[:, None] * B[None, :]
            dC_ref[c * T + k] = jnp.sum(gy[:, None] * h, axis=0)
        for k in reversed(range(T)):
            x, dt, B, C, keep, gy = rows[k]
            t = c * T + k
            decay = decay_of(dt, keep)
            g = g + gy[:, None] * C[None, :]  # dL/dh_t
            gB = jnp.sum(g * B[None, :], axis=1)
            dx_ref[t] = (dt * gB).astype(dx_ref.dtype)
            dB_ref[t] = jnp.sum(g * (dt * x)[:, None], axis=0)
            gda = g * before[k] * decay  # dL/d(dt A) through the decay
            ddt_ref[t] = (x * gB + jnp.sum(gda * A, axis=1)).astype(ddt_ref.dtype)
            dA = dA + gda * dt[:, None]
            g = decay * g
        return g, dA, ahead

    init = (ghl_ref[...].astype(F32), jnp.zeros(A.shape, F32), load(n - 1) if prefetch else ())
    g, dA, _ = jax.lax.fori_loop(0, n, body, init)
    dA_ref[...] = dA
    dh0_ref[...] = g


def _adj_kernel(*refs, T, n, has_keep, fast):
    """The adjoint alone, from zero at the end: g_{t-1} = a_t (g_t + gy_t C_t), chunks in reverse.
    refs: dt [S, be]; A [be, N]; C [S, N]; keep [S]?; gy [S, be] -> g_{-1} = dL/dh0 [be, N] float32
    (the state's own recomputation and every other gradient are left to ``_bwd_kernel``)."""
    dt_ref, A_ref, C_ref, *refs = refs
    keep_ref = refs.pop(0) if has_keep else None
    gy_ref, g0_ref = refs
    A2 = A_ref[...].astype(F32) * LOG2E

    def body(i, g):
        t0 = (n - 1 - i) * T
        rows = [(dt_ref[t0 + k].astype(F32), C_ref[t0 + k].astype(F32), keep_ref[t0 + k] if has_keep else None,
                 gy_ref[t0 + k].astype(F32)) for k in range(T)]
        for dt, C, keep, gy in reversed(rows):
            decay = exp2(dt[:, None] * A2, fast)
            if has_keep:
                decay = decay * keep
            g = decay * (g + gy[:, None] * C[None, :])
        return g

    g0_ref[...] = jax.lax.fori_loop(0, n, body, jnp.zeros(A2.shape, F32))


def _specs(S, N, n, be, has_keep, row=None):
    """BlockSpecs over the grid (batch row i, channel block j); the sequence inputs' (``ins``: x, dt, A,
    B, C, keep?) read row ``row(i)`` (default i)."""
    sq = pl.squeezed
    r = row or (lambda i: i)
    seq_e = pl.BlockSpec((sq, S, be), lambda i, j: (i, 0, j))
    state = pl.BlockSpec((sq, be, N), lambda i, j: (i, j, 0))
    a = pl.BlockSpec((be, N), lambda i, j: (j, 0))
    seq_e_in = pl.BlockSpec((sq, S, be), lambda i, j: (r(i), 0, j))
    seq_n_in = pl.BlockSpec((sq, S, N), lambda i, j: (r(i), 0, 0))
    ins = [seq_e_in, seq_e_in, a, seq_n_in, seq_n_in] + ([pl.BlockSpec((sq, S), lambda i, j: (r(i), 0))]
                                                         if has_keep else [])
    chunks = pl.BlockSpec((sq, n, be, N), lambda i, j: (i, 0, j, 0))
    partial_n = pl.BlockSpec((sq, sq, S, N), lambda i, j: (i, j, 0, 0))
    return ins, seq_e, state, chunks, partial_n


@functools.lru_cache(maxsize=None)
def _make(chunk, block_e, num_warps, bwd_block_e, bwd_num_warps, prefetch, interpret, splits=1, y_dtype=F32,
          split_tiles=None):
    """The custom_vjp scan for padded inputs (S a multiple of splits x each pass's chunk, E of the block sizes, N a
    power of 2); ``split_tiles``: (channels, warps, chunk, prefetch) of the split's extra passes (pass 1, the adjoint)
    when ``splits`` > 1."""
    fast = not interpret  # exp2 as one PTX instruction

    def params(warps):
        return None if interpret else plgpu.CompilerParams(num_warps=warps)

    def forward(x, dt, A, B, C, keep, h0, save, emit_y=True, rows=None, tiles=(block_e, num_warps, chunk, prefetch)):
        """``rows``: (grid rows, row map) to scan only some of x's rows (h0 and outputs have grid rows);
        ``tiles``: (channels, warps, chunk, prefetch) of a program."""
        b, S, E = x.shape
        (be, warps, T, pf), N = tiles, A.shape[-1]
        n = S // T
        b, row = rows or (b, None)
        ins, seq_e, state, chunks, _ = _specs(S, N, n, be, keep is not None, row)
        out_shape = [jax.ShapeDtypeStruct((b, S, E), y_dtype)] if emit_y else []
        out_shape.append(jax.ShapeDtypeStruct((b, E, N), F32))
        out_specs = ([seq_e] if emit_y else []) + [state]
        if save:
            out_shape.append(jax.ShapeDtypeStruct((b, n, E, N), F32))
            out_specs.append(chunks)
        kernel = functools.partial(_fwd_kernel, T=T, n=n, has_keep=keep is not None, save=save,
                                   prefetch=pf, fast=fast, emit_y=emit_y)
        args = [x, dt, A, B, C] + ([keep] if keep is not None else []) + [h0]
        return pl.pallas_call(kernel, out_shape=out_shape, grid=(b, E // be), in_specs=ins + [state],
                              out_specs=out_specs, interpret=interpret, compiler_params=params(warps),
                              name="selective_scan_fwd")(*args)

    def backward(x, dt, A, B, C, keep, hc, gy, ghl):
        """dx, ddt; dA [b, E, N], dB, dC [b, E / be, S, N] (partial sums); dh0 [b, E, N]."""
        b, S, E = x.shape
        N, n, be = A.shape[-1], S // chunk, bwd_block_e
        ins, seq_e, state, chunks, partial_n = _specs(S, N, n, be, keep is not None)
        out_shape = [jax.ShapeDtypeStruct((b, S, E), x.dtype), jax.ShapeDtypeStruct((b, S, E), dt.dtype),
                     jax.ShapeDtypeStruct((b, E, N), F32), jax.ShapeDtypeStruct((b, E // be, S, N), F32),
                     jax.ShapeDtypeStruct((b, E // be, S, N), F32), jax.ShapeDtypeStruct((b, E, N), F32)]
        kernel = functools.partial(_bwd_kernel, T=chunk, n=n, has_keep=keep is not None, prefetch=prefetch, fast=fast)
        args = [x, dt, A, B, C] + ([keep] if keep is not None else []) + [hc, gy, ghl.astype(F32)]  # gy in y's dtype
        return pl.pallas_call(
            kernel, out_shape=out_shape, grid=(b, E // be), in_specs=ins + [chunks, seq_e, state],
            out_specs=[seq_e, seq_e, state, partial_n, partial_n, state], interpret=interpret,
            compiler_params=params(bwd_num_warps), name="selective_scan_bwd")(*args)

    def adjoint(dt, A, C, keep, gy, rows):
        """dL/dh0 [rows, E, N] from gy alone (zero adjoint after the last step), for the rows that
        ``rows`` = (grid rows, row map) names."""
        _, S, E = dt.shape
        (be, warps, T, _), N = split_tiles, A.shape[-1]
        n = S // T
        b, row = rows
        ins, _, state, _, _ = _specs(S, N, n, be, keep is not None, row)
        kernel = functools.partial(_adj_kernel, T=T, n=n, has_keep=keep is not None, fast=fast)
        args = [dt, A, C] + ([keep] if keep is not None else []) + [gy]
        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((b, E, N), F32), grid=(b, E // be),
                              in_specs=[ins[1], ins[2], ins[4]] + ins[5:] + [ins[1]], out_specs=state,
                              interpret=interpret, compiler_params=params(warps),
                              name="selective_scan_adjoint")(*args)

    cast = lambda g, like: g.astype(like.dtype)  # noqa: E731

    if splits == 1:
        @jax.custom_vjp
        def scan(x, dt, A, B, C, keep, h0):
            return tuple(forward(x, dt, A, B, C, keep, h0, save=False))

        def scan_fwd(x, dt, A, B, C, keep, h0):
            y, h_last, hc = checkpoint_name(forward(x, dt, A, B, C, keep, h0, save=True), RESIDUALS)
            return (y, h_last), (x, dt, A, B, C, keep, hc)

        def scan_bwd(res, cts):
            x, dt, A, B, C, keep, hc = res
            gy, ghl = cts
            dx, ddt, dA, dB, dC, dh0 = backward(x, dt, A, B, C, keep, hc, gy, ghl)
            return (dx, ddt, cast(dA.sum(0), A), cast(dB.sum(1), B), cast(dC.sum(1), C),
                    None if keep is None else jnp.zeros_like(keep), dh0)

        scan.defvjp(scan_fwd, scan_bwd)
        return scan

    # Sequence split: row i's sequence is cut into P = splits pieces, folded into the batch axis
    # ([b, S, ...] -> [b P, S / P, ...], a free reshape), so every kernel runs on b P rows.
    P = splits

    def fold(a):
        return None if a is None else a.reshape(a.shape[0] * P, a.shape[1] // P, *a.shape[2:])

    def piece_decay(dt, A, keep):
        """prod_t a_t over each piece, [b, P, E, N]: exp(A sum_t dt_t) prod_t keep_t."""
        b, S, E = dt.shape
        decay = jnp.exp(dt.astype(F32).reshape(b, P, S // P, E).sum(2)[..., None] * A)
        if keep is not None:
            decay = decay * jnp.prod(keep.reshape(b, P, S // P), axis=2)[:, :, None, None]
        return decay

    def combine(decay, local, carry, reverse):
        """P - 1 float32 steps across pieces. Forward: the state before each piece, h(0) = carry,
        h(p + 1) = decay(p) h(p) + local(p) (decay, local [b, P - 1, E, N] of pieces 0..P-2); reverse:
        the adjoint after each piece, g(P - 1) = carry, g(p - 1) = decay(p) g(p) + local(p) (pieces
        1..P-1). Returns [b, P, E, N]."""
        def step(h, dl):
            return dl[0] * h + dl[1], h
        last, out = jax.lax.scan(step, carry, (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(local, 1, 0)),
                                 reverse=reverse, unroll=True)  # elementwise steps: unrolled, fusible
        out = jnp.moveaxis(out, 0, 1)
        return jnp.concatenate([last[:, None], out] if reverse else [out, last[:, None]], axis=1)

    def pieces_but(b, skip):
        """(grid rows, row map) over the b P folded rows leaving out each row's last (skip=0) or
        first (skip=1) piece, whose local state or adjoint the combine does not use."""
        return b * (P - 1), lambda i: (i // (P - 1)) * P + i % (P - 1) + skip

    def split_forward(x, dt, A, B, C, keep, h0, save):
        b, S, E = x.shape
        N = A.shape[-1]
        xf, dtf, Bf, Cf, kf = map(fold, (x, dt, B, C, keep))
        # Pass 1: pieces 0..P-2 from h = 0, their final states only; then the true state before each piece.
        (h_end,) = forward(xf, dtf, A, Bf, Cf, kf, jnp.zeros((b * (P - 1), E, N), F32), save=False, emit_y=False,
                           rows=pieces_but(b, 0), tiles=split_tiles)
        h_init = combine(piece_decay(dt, A, keep)[:, :-1], h_end.reshape(b, P - 1, E, N), h0, reverse=False)
        # [b, P, E, N]: a remat policy that keeps this name (layers.REMAT_POLICIES "dots") spares the
        # backward's recomputation pass 1, whose only product it is
        h_init = checkpoint_name(h_init, PIECE_STATES)
        # Pass 2: each piece from its true initial state.
        out = forward(xf, dtf, A, Bf, Cf, kf, h_init.reshape(b * P, E, N), save=save)
        y, h_last = out[0].reshape(b, S, E), out[1].reshape(b, P, E, N)[:, -1]
        return (y, h_last) + ((out[2].reshape(b, S // chunk, E, N),) if save else ())

    @jax.custom_vjp
    def split_scan(x, dt, A, B, C, keep, h0):
        return split_forward(x, dt, A, B, C, keep, h0, save=False)

    def split_scan_fwd(x, dt, A, B, C, keep, h0):
        # named: a remat policy that keeps them (layers.REMAT_POLICIES "dots_scan") runs no forward in the backward
        y, h_last, hc = checkpoint_name(split_forward(x, dt, A, B, C, keep, h0, save=True), RESIDUALS)
        return (y, h_last), (x, dt, A, B, C, keep, hc)

    def split_scan_bwd(res, cts):
        x, dt, A, B, C, keep, hc = res  # hc: the true states at chunk starts, as the unsplit scan saves
        gy, ghl = cts
        b, S, E = x.shape
        N = A.shape[-1]
        xf, dtf, Bf, Cf, kf, gyf = map(fold, (x, dt, B, C, keep, gy))
        # Pass 1: pieces 1..P-1, their adjoints from zero after their ends; then the true adjoint after each piece.
        g_start = adjoint(dtf, A, Cf, kf, gyf, rows=pieces_but(b, 1)).reshape(b, P - 1, E, N)
        g_end = combine(piece_decay(dt, A, keep)[:, 1:], g_start, ghl.astype(F32), reverse=True)
        # Pass 2: the backward kernel per piece from its true state (hc) and true adjoint (g_end).
        dx, ddt, dA, dB, dC, dh0 = backward(xf, dtf, A, Bf, Cf, kf, hc.reshape(b * P, -1, E, N), gyf,
                                            g_end.reshape(b * P, E, N))
        unfold = lambda g: g.sum(1).reshape(b, S, N)  # noqa: E731
        return (dx.reshape(b, S, E), ddt.reshape(b, S, E), cast(dA.sum(0), A), cast(unfold(dB), B),
                cast(unfold(dC), C), None if keep is None else jnp.zeros_like(keep), dh0.reshape(b, P, E, N)[:, 0])

    split_scan.defvjp(split_scan_fwd, split_scan_bwd)
    return split_scan


def auto_splits(b: int, s: int, E: int, block_e: int, sms: int, *, target: int = 2, min_piece: int = 1024) -> int:
    """The smallest power of 2 P with b ceil(E / block_e) P >= ``target`` x ``sms`` (the GPU's SMs) forward programs,
    keeping pieces of at least ``min_piece`` steps (1 when the rows and channel blocks fill the GPU)."""
    programs, P = b * -(-E // block_e), 1
    while programs * P < target * sms and s // (2 * P) >= min_piece:
        P *= 2
    return P


def selective_scan_pallas(x, dt, A, B, C, *, keep=None, h0=None, chunk: int = 8, block_e: int = 64,
                          num_warps: int = 4, bwd_block_e: int = 16, bwd_num_warps: int = 1, prefetch: bool = False,
                          seq_splits: int | None = None, split_block_e: int = 64, split_num_warps: int = 2,
                          split_chunk: int = 16, split_prefetch: bool = True, y_dtype=F32, interpret=None):
    """(y [b, s, E] = C_t . h_t in ``y_dtype``, h_last [b, E, N] float32); differentiable in x, dt, A, B, C, h0.

    x, dt [b, s, E] and B, C [b, s, N] in any float dtype (read as is, computed in float32);
    A [E, N]; keep [b, s] (1 - reset) or None; h0 [b, E, N] or None (zeros). ``chunk``: steps
    unrolled per loop iteration, and the spacing of the states saved for the backward;
    ``block_e`` / ``num_warps`` (forward) and ``bwd_block_e`` / ``bwd_num_warps`` (backward):
    channels and warps per program (block sizes are rounded down to powers of 2, at most the power of 2 at or above E);
    ``prefetch``: load the next chunk's inputs while computing this one's (more registers).
    ``seq_splits``: pieces P each sequence is cut into (module docstring); None chooses it
    (``auto_splits`` on a GPU, 1 in the interpreter); 1 is the plain scan. ``split_block_e``, ``split_num_warps``,
    ``split_chunk``, ``split_prefetch``: the same settings for the split's extra passes (pass 1, and the adjoint,
    which does not prefetch): without y to write they run fastest at 16 steps a chunk, 2 warps a program.
    ``y_dtype``: the dtype y is written in (its gradient is then read in it too; the arithmetic stays float32).
    ``interpret`` (default: not on a GPU) runs the kernels in the Pallas interpreter.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    b, s, E = x.shape
    N = A.shape[-1]
    tiles = dict(chunk=chunk, block_e=block_e, num_warps=num_warps, bwd_block_e=bwd_block_e,
                 bwd_num_warps=bwd_num_warps, split_block_e=split_block_e, split_num_warps=split_num_warps,
                 split_chunk=split_chunk)
    for name, value in tiles.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} is {value!r}; use a positive integer.")
    T, Ts = int(chunk), int(split_chunk)
    be, bbe, sbe = (min(_pow2_floor(v), _pow2_ceil(E)) for v in (block_e, bwd_block_e, split_block_e))
    if seq_splits is None:
        P = 1 if interpret else auto_splits(b, s, E, be, sm_count())
    elif isinstance(seq_splits, bool) or not isinstance(seq_splits, (int, np.integer)) or seq_splits <= 0:
        raise ValueError(f"seq_splits is {seq_splits!r}; use a positive integer (1: no split) or None (auto).")
    else:
        P = int(seq_splits)
    split = (sbe, int(split_num_warps), Ts, bool(split_prefetch)) if P > 1 else None
    Tm, Em = (max(T, Ts), max(be, bbe, sbe)) if split else (T, max(be, bbe))  # pieces: whole chunks of both passes
    S, Ep, Np = -(-s // (Tm * P)) * Tm * P, -(-E // Em) * Em, _pow2_ceil(N)

    def pad(a, *widths):
        return a if not any(widths) else jnp.pad(a, [(0, w) for w in widths])

    x, dt = pad(x, 0, S - s, Ep - E), pad(dt, 0, S - s, Ep - E)  # dt = 0: the state is unchanged
    B, C = pad(B, 0, S - s, Np - N), pad(C, 0, S - s, Np - N)
    A = pad(A.astype(F32), Ep - E, Np - N)
    keep = None if keep is None else jnp.pad(keep.astype(F32), [(0, 0), (0, S - s)], constant_values=1.0)
    h0 = jnp.zeros((b, Ep, Np), F32) if h0 is None else pad(h0.astype(F32), 0, Ep - E, Np - N)
    scan = _make(T, be, int(num_warps), bbe, int(bwd_num_warps), bool(prefetch), bool(interpret), P,
                 jnp.dtype(y_dtype), split)
    y, h_last = scan(x, dt, A, B, C, keep, h0)
    return y[:, :s, :E], h_last[:, :E, :N]
