"""A batch-1 decoding step's wide projections as one Pallas (Triton) kernel: y = x @ w for one row x [K] and
w [K, N] in bf16 or fp16, N >= ``MIN_N``.

XLA multiplies one row either as a broadcast multiply and reduce (its dot strength reduction, which
writes and re-reads a product the size of w) or, in ``layers``, as a two-row GEMM with a zero row (a
padding kernel, and a GEMM that computes two rows). Here each program owns a [K, block_n] column slice of
w and streams it in [block_k, block_n] tiles through the tensor cores (Triton pipelines the loads): one
kernel that reads w once. The row is broadcast to the 16 rows a tensor-core product takes; the copies are
equal, and the kernel keeps one.

On an H200 the 1.26B config's batch-1 decoding step (W_qkv, W_gate_up and the LM head here) ran 2.5-4.5%
faster than with the two-row GEMM. ``plan`` takes only what paid: not more rows (Mamba's and the 350M
Transformer's batch-64 steps: within 1%), and not narrow outputs, which need K split over programs to fill
the GPU (alone, with 2-4 splits summed by XLA, the kernel beat the two-row path at W_o and W_down too;
that form was not tried in the model). ``experiments/BENCHMARKS.md`` has the variants that lost.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from models.flash_kernel import compiler_params, resolve_interpret, sm_count

MIN_N = 3072  # narrower outputs leave SMs idle without a K split (the split form is not used: see above)


def plan(m: int, k: int, n: int, dtype) -> dict | None:
    """Tiles for x [m, k] @ w [k, n] of ``dtype``, or None when the kernel does not take the shape (m != 1,
    n < ``MIN_N``, not bf16/fp16, or K not a multiple of the K tile).

    block_n 64 while that gives at least two thirds of the SMs a program, else 32; block_k 256 (at the
    1.26B config's W_qkv [2048, 6144] and W_gate_up [2048, 11264] on an H200: within 2% of the best of a
    sweep over block_n 16-64, block_k 256-512 and K splits 1-8)."""
    if m != 1 or n < MIN_N or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        return None
    block_n = 64 if n // 64 >= 2 * sm_count() // 3 else 32
    if n % block_n or k % 256:
        return None
    return dict(block_n=block_n, block_k=256, num_warps=4, num_stages=3)


def _kernel(x_ref, w_ref, o_ref, *, block_k: int, steps: int):
    """One [K, block_n] column slice: acc [16, block_n] += 16 copies of x[k tile] @ w[k tile] over the K tiles."""

    def body(i, acc):
        k0 = pl.multiple_of(i * block_k, block_k)
        xk = jnp.broadcast_to(x_ref[:, pl.ds(k0, block_k)], (16, block_k))  # tensor-core products take 16 rows
        return acc + jnp.dot(xk, w_ref[pl.ds(k0, block_k), :], preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((16, o_ref.shape[-1]), jnp.float32))
    o_ref[...] = jnp.max(acc, axis=0, keepdims=True).astype(o_ref.dtype)  # the copies are equal: any one


def _product(x, w, out_dtype, tiles: dict, interpret: bool):
    k, n = w.shape
    block_n, block_k = tiles["block_n"], tiles["block_k"]
    return pl.pallas_call(
        functools.partial(_kernel, block_k=block_k, steps=k // block_k),
        out_shape=jax.ShapeDtypeStruct((1, n), out_dtype), grid=(n // block_n,),
        in_specs=[pl.BlockSpec((1, k), lambda j: (0, 0)), pl.BlockSpec((k, block_n), lambda j: (0, j))],
        out_specs=pl.BlockSpec((1, block_n), lambda j: (0, j)),
        interpret=interpret, compiler_params=compiler_params(interpret, tiles["num_warps"], tiles["num_stages"]),
        name=f"decode_matmul_{k}x{n}")(x, w)


def takes(x: jax.Array, w: jax.Array) -> bool:
    """Whether ``decode_matmul`` multiplies x [..., K] by w [K, N]: same dtype and a shape ``plan`` takes."""
    k, n = w.shape
    return x.dtype == w.dtype and x.shape[-1] == k and plan(x.size // k, k, n, x.dtype) is not None


def decode_matmul(x: jax.Array, w: jax.Array, out_dtype=None, *, interpret=None, **tiles) -> jax.Array:
    """x [..., K] holding one row @ w [K, N] (same dtype), float32 accumulation -> [..., N] in ``out_dtype``
    (default x's), for shapes the kernel ``takes`` (ValueError otherwise). ``tiles`` override the plan's
    (block_n, block_k, num_warps, num_stages). ``interpret`` (default: off a GPU) runs the Pallas
    interpreter. The forward only: ``layers.linear``, which calls it, gives it its backward."""
    if not takes(x, w):
        raise ValueError(f"decode_matmul takes one bf16/fp16 row x of w's dtype times w [K, N] with N >= {MIN_N} "
                         f"and K a multiple of 256; got x {x.shape} {x.dtype}, w {w.shape} {w.dtype}.")
    k, n = w.shape
    chosen = {**plan(1, k, n, x.dtype), **tiles}
    y = _product(x.reshape(1, k), w, jnp.dtype(out_dtype or x.dtype), chosen, resolve_interpret(interpret))
    return y.reshape(*x.shape[:-1], n)
