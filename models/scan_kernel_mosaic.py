"""Prototype: the selective-scan forward (``models/scan_kernel.py``'s ``_fwd_kernel``) as a Pallas Mosaic GPU kernel.

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t        h [E, N] float32, h_{-1} = h0
    y_t = C_t . h_t

x, dt [b, S, E]; A [E, N]; B, C [b, S, N]; h0 [b, E, N]. Forward only, no resets, not used by the model:
it exists to measure Mosaic GPU against the Triton kernel (``experiments/bench_scan_mosaic.py``).

Programming model (``jax.experimental.pallas.mosaic_gpu``, warpgroup lowering semantics): one program is one
CUDA block running one warpgroup (128 threads) that executes array code in lockstep. The register layouts a
[rows, cols] float32 array can take without hand-written layouts are the Hopper MMA accumulator's
(``Layout.WGMMA``: rows % 64 == 0, cols % 8 == 0), its row and column reductions (``WGMMA.reduce(1)`` [rows],
``.reduce(0)`` [cols]) and the flat ``WG_STRIDED`` (size % 128 == 0, no axis reductions). So the state tile
is h [64, N] (N % 8 == 0): channels on the 64 MMA rows (two per thread, replicated over 4 lanes), the state
on the columns; ``sum(h * C, axis=1)`` reduces across those 4 lanes, and x, dt [64] (row vectors) and
B, C [N] (column vectors) broadcast into h for free. This is the same tile and thread count as the Triton
kernel's default (block_e 64, 4 warps); smaller channel blocks (the Triton backward's 16 on 1 warp) cannot be
expressed in these layouts, and a sum over channels (axis 0, as the backward's dB and dC need) crosses the 4
warps: a shared-memory scratch and two warpgroup barriers per reduction.

Grid (b, E / 64), one program per (row, channel block). Inputs stay in global memory (a whole [S, 64] block
of x alone is 256 KiB in bf16 at S = 2048, more than an SM's 227 KiB of shared memory) and each step reads
its rows with plain loads at a dynamic offset, as the Triton kernel does; ``chunk`` steps are unrolled per
loop iteration with their loads issued first. (Staging chunks in shared memory with TMA copies,
``plgpu.emit_pipeline`` with a carry, is the Mosaic GPU way to hide load latency; not tried here.)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from models.flash_kernel import F32, LOG2E

try:
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None
# Written against jax 0.11's Mosaic GPU API (warpgroup lowering with layout inference, ``plgpu.load`` of a
# ``ref.at`` view, the public CPU interpreter). On jax 0.10.2 the same kernel does not lower: layout
# inference ran for over 8 minutes on the smallest shape without finishing, and the interpreter has no rule
# for ``plgpu.load``.
AVAILABLE = plgpu is not None and hasattr(plgpu, "InterpretGPUParams")

BLOCK_E = 64  # the WGMMA layout's row tile: the smallest channel block one warpgroup can hold as [rows, N]


def _load(ref, layout):
    """A global-memory ref view as float32 registers in ``layout`` (plain loads, ``optimized=False``: the
    optimized transfers are for shared memory only)."""
    return plgpu.load(ref, layout=layout, optimized=False).astype(F32)


def _fwd_kernel(x_ref, dt_ref, A_ref, B_ref, C_ref, h0_ref, y_ref, hl_ref, *, T, n):
    """One (batch row, 64-channel block). Refs are whole arrays in global memory: x, dt [b, S, E];
    A [E, N]; B, C [b, S, N]; h0 [b, E, N] -> y [b, S, E] float32, h_last [b, E, N] float32."""
    i = jax.lax.axis_index("b")
    e = pl.ds(jax.lax.axis_index("e") * BLOCK_E, BLOCK_E)
    tile, row, col = plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1), plgpu.Layout.WGMMA.reduce(0)
    A2 = _load(A_ref.at[e, :], tile) * LOG2E

    def body(c, h):
        t0 = c * T
        rows = [(_load(x_ref.at[i, t0 + k, e], row), _load(dt_ref.at[i, t0 + k, e], row),
                 _load(B_ref.at[i, t0 + k, :], col), _load(C_ref.at[i, t0 + k, :], col)) for k in range(T)]
        for k, (x, dt, B, C) in enumerate(rows):
            h = jnp.exp2(dt[:, None] * A2) * h + (dt * x)[:, None] * B[None, :]
            y_ref[i, t0 + k, e] = jnp.sum(h * C[None, :], axis=1)
        return h

    hl_ref[i, e, :] = jax.lax.fori_loop(0, n, body, _load(h0_ref.at[i, e, :], tile))


@functools.lru_cache(maxsize=None)
def _make(shape, N, chunk, barriers, approx_math, interpret):
    b, S, E = shape
    kernel = functools.partial(_fwd_kernel, T=chunk, n=S // chunk)
    params = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                  unsafe_no_auto_barriers=not barriers, approx_math=approx_math)
    return plgpu.kernel(kernel, out_type=(jax.ShapeDtypeStruct((b, S, E), F32), jax.ShapeDtypeStruct((b, E, N), F32)),
                        grid=(b, E // BLOCK_E), grid_names=("b", "e"), compiler_params=params,
                        interpret=plgpu.InterpretGPUParams() if interpret else None)


def selective_scan_mosaic(x, dt, A, B, C, *, h0=None, chunk: int = 8, barriers: bool = False,
                          approx_math: bool = False, interpret=None):
    """(y [b, s, E] float32, h_last [b, E, N] float32), forward only (no gradient, no resets).

    x, dt [b, s, E] and B, C [b, s, N] in any float dtype; A [E, N]; h0 [b, E, N] or None (zeros). Needs
    s % chunk == 0, E % 64 == 0 and N % 8 == 0 (the WGMMA register layout's tile): a prototype for timing
    against ``selective_scan_pallas``, which pads instead. ``barriers``: keep the warpgroup barrier Mosaic GPU
    puts before and after every store (two ``bar.sync`` per step, for the y row); they order a thread's
    reads and writes of one memory region, and this kernel never reads what it writes, so they are off by
    default (``CompilerParams.unsafe_no_auto_barriers``). ``approx_math``: ``ex2.approx.ftz`` for exp2.
    ``interpret`` (default: not on a GPU) runs the kernel in the Mosaic GPU interpreter on CPU."""
    if not AVAILABLE:
        raise RuntimeError(f"the Mosaic GPU scan needs jax >= 0.11 (jax.experimental.pallas.mosaic_gpu with "
                           f"InterpretGPUParams); this is jax {jax.__version__}.")
    b, s, E = x.shape
    N = A.shape[-1]
    if s % chunk or E % BLOCK_E or N % 8:
        raise ValueError(f"shape (s={s}, E={E}, N={N}) needs s % chunk ({chunk}) == 0, E % {BLOCK_E} == 0 and "
                         "N % 8 == 0; pad the inputs or use models.scan_kernel.selective_scan_pallas.")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    h0 = jnp.zeros((b, E, N), F32) if h0 is None else h0.astype(F32)
    scan = _make((b, s, E), N, int(chunk), bool(barriers), bool(approx_math), bool(interpret))
    return scan(x, dt, A.astype(F32), B, C, h0)
