"""Mamba's step sizes dt = softplus(dt_low W_dt + dt_bias) as Pallas (Triton) kernels, with their gradient.

x_proj's output dbc [b, s, R + 2N] holds dt_low in its first R columns (read in place); W_dt [R, E];
dt_bias [E]. ``dt`` is differentiable (``jax.custom_vjp``):

    forward   dt = live softplus(v),  v = dt_low W_dt + dt_bias        (one kernel: the product on the
                                                                         tensor cores, float32 after it)
    backward  dv = live g sigmoid(v)                                    (one kernel, v recomputed)
              d dt_low = dv W_dt^T,  dW_dt = dt_low^T dv,  d dt_bias = sum dv   (XLA)

XLA wrote the product [b, s, E], read it back for the softplus and the mask, and remat kept the product
for the backward. Here the forward writes dt once and nothing [b, s, E] is kept but dt itself (recomputed
under remat). The softplus and sigmoid use the GPU's approximate base-2 exp and log (PTX ``ex2.approx.ftz``,
``lg2.approx``; PTX documents errors of about 2^-22): with libdevice's exact ``expf`` and ``logf`` the forward was
bound by arithmetic and slower than XLA's. On an H200 (jax 0.11.2) the 370M Mamba trained 1.025-1.027x
faster at 2k, 8k and 32k, and its prefill of 64 x 2048 tokens lost 17 ms (``experiments/BENCHMARKS.md``; timed
with ``ex2.approx``, whose ``.ftz`` form, ``flash_kernel.exp2``, differs only in flushing results under 2^-126).

Under an active mesh the kernels run in ``sharding.per_device`` (rows by ``batch``, channels by ``inner``);
the three products of the backward are XLA's, in the global view. ``interpret`` (off a GPU) runs the
Pallas interpreter with exact exp2 and log2 instead of the PTX instructions.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from models.flash_kernel import F32, LOG2E, block_size, compiler_params, exp2, resolve_interpret, softplus
from parallel import sharding

BLOCK_ROWS, BLOCK_CHANNELS, WARPS = 32, 128, 4  # fastest of 12 tilings at 64 x 2048 tokens, E 2048 (H200): 0.36 ms


def _product(lo_ref, w_ref, bias_ref):
    """v = dt_low [bm, R] @ W_dt [R, be] + bias [be], float32."""
    return jnp.dot(lo_ref[...], w_ref[...], preferred_element_type=F32) + bias_ref[...].astype(F32)[None, :]


def _fwd_kernel(lo_ref, w_ref, bias_ref, live_ref, o_ref, *, approx: bool):
    v = _product(lo_ref, w_ref, bias_ref)
    o_ref[...] = jnp.where(live_ref[...][:, None] > 0, softplus(v, approx), 0.0).astype(o_ref.dtype)


def _grad_kernel(lo_ref, w_ref, bias_ref, live_ref, g_ref, o_ref, *, approx: bool):
    v = _product(lo_ref, w_ref, bias_ref)
    dv = g_ref[...].astype(F32) / (1.0 + exp2(-v * LOG2E, approx))  # g sigmoid(v)
    o_ref[...] = jnp.where(live_ref[...][:, None] > 0, dv, 0.0).astype(o_ref.dtype)


@functools.lru_cache(maxsize=None)
def _call(grad: bool, m: int, R: int, E: int, out_dtype, interpret: bool):
    bm, be = block_size(m, BLOCK_ROWS), block_size(E, BLOCK_CHANNELS)
    tile = pl.BlockSpec((bm, be), lambda i, j: (i, j))
    in_specs = [pl.BlockSpec((bm, R), lambda i, j: (i, 0)), pl.BlockSpec((R, be), lambda i, j: (0, j)),
                pl.BlockSpec((be,), lambda i, j: (j,)), pl.BlockSpec((bm,), lambda i, j: (i,))] + [tile] * grad
    return pl.pallas_call(
        functools.partial(_grad_kernel if grad else _fwd_kernel, approx=not interpret),
        out_shape=jax.ShapeDtypeStruct((m, E), out_dtype), grid=(m // bm, E // be), in_specs=in_specs,
        out_specs=tile, interpret=interpret, compiler_params=compiler_params(interpret, WARPS, 3),
        name="mamba_dt_grad" if grad else "mamba_dt")


def takes(seq: int, R: int, E: int) -> bool:
    """Whether ``dt`` takes sequences of ``seq`` tokens with dt_rank R and E channels: R a power of 2 of at least
    16, seq and E multiples of 16 (a tensor-core product's least depth and sides)."""
    return R >= 16 and R & (R - 1) == 0 and seq % 16 == 0 and E % 16 == 0


def _kernel(grad: bool, out_dtype, interpret: bool):
    """The forward (or gradient) kernel on [b, s, .] arrays, per device under an active mesh."""
    def run(dbc, w, bias, live, *g):
        b, s, c = dbc.shape
        m, E = b * s, w.shape[1]
        call = _call(grad, m, w.shape[0], E, jnp.dtype(out_dtype), interpret)
        out = call(dbc.reshape(m, c), w.astype(dbc.dtype), bias, live.reshape(m), *(x.reshape(m, E) for x in g))
        return out.reshape(b, s, E)

    tile = ("batch", "seq", "inner")
    names = (("batch", "seq", None), (None, "inner"), ("inner",), ("batch", "seq")) + (tile,) * grad
    return sharding.per_device(run, names, tile)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dt(dbc, w, bias, live, out_dtype, interpret):
    return _kernel(False, out_dtype, interpret)(dbc, w, bias, live)


def _dt_fwd(dbc, w, bias, live, out_dtype, interpret):
    return _dt(dbc, w, bias, live, out_dtype, interpret), (dbc, w, bias, live)


def _dt_bwd(out_dtype, interpret, res, g):
    dbc, w, bias, live = res
    R = w.shape[0]
    dv = _kernel(True, dbc.dtype, interpret)(dbc, w, bias, live, g)  # [b, s, E] in dbc's dtype
    d_low = jnp.einsum("bse,re->bsr", dv, w.astype(dv.dtype), preferred_element_type=F32).astype(dbc.dtype)
    d_dbc = jnp.concatenate([d_low, jnp.zeros((*dbc.shape[:2], dbc.shape[2] - R), dbc.dtype)], axis=-1)
    dw = jnp.einsum("bsr,bse->re", dbc[..., :R], dv, preferred_element_type=F32).astype(w.dtype)
    dbias = jnp.sum(dv.astype(F32), axis=(0, 1)).astype(bias.dtype)
    return d_dbc, dw, dbias, jnp.zeros_like(live)


_dt.defvjp(_dt_fwd, _dt_bwd)


def dt(dbc, w, bias, nonpad=None, out_dtype=None, *, interpret=None):
    """dt [b, s, E] in ``out_dtype`` (default dbc's) = softplus(dbc[..., :R] @ w + bias), 0 where nonpad [b, s] is
    False (None: every token real), for dbc [b, s, >= R], w [R, E] (cast to dbc's dtype), bias [E]; shapes
    ``takes`` (ValueError otherwise). Differentiable in dbc, w and bias (module docstring)."""
    b, s, c = dbc.shape
    R, E = w.shape
    if not takes(s, R, E) or c < R:
        raise ValueError(f"dt_kernel.dt takes dbc [b, s, >= R] and w [R, E] with R a power of 2 >= 16 and s, E "
                         f"multiples of 16; got dbc {dbc.shape}, w {w.shape}.")
    live = jnp.ones((b, s), F32) if nonpad is None else nonpad.astype(F32)
    return _dt(dbc, w, bias, live, jnp.dtype(out_dtype or dbc.dtype), resolve_interpret(interpret))
