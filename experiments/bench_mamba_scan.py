"""Time Mamba's selective scan on one GPU: 'reference' (lax.scan), 'chunked' (XLA) and 'pallas' (Triton kernels).

    python -m experiments.bench_mamba_scan                   # b8 L2048 E4096 N16, bf16 x/dt/B/C, f32 A
    python -m experiments.bench_mamba_scan --skip-reference  # the sequential lax.scan is slow
    python -m experiments.bench_mamba_scan --sweep [fwd|bwd]  # also pallas block sizes / warps / chunk
    python -m experiments.bench_mamba_scan --quick           # tiny shape, CPU (interpreted kernels), seconds
    python -m experiments.bench_mamba_scan --splits 1,2,4,8,16,0  # only pallas sequence splits (0: auto)

Forward is ``selective_scan`` (y, h_last); forward+backward is jax.grad of sum(y) + sum(h_last)
w.r.t. x, dt, A, B, C. Each time is the median of ``--runs`` calls after a warm-up, rotating
among 3 input sets, with block_until_ready. Pallas is checked against chunked on the same
inputs (relative error of outputs and gradients). The CUDA column is the official Mamba kernel
on one H200 at the full shape (1.19 ms forward, 4.63 ms backward).

``--splits``: the Pallas scan with its sequence cut into P pieces (``seq_splits``; scanned from zero,
combined, rescanned) at each of ``--shapes`` (default b1 L32768 E2048 and b8 L2048 E4096, N16):
forward and forward+backward ms, their ratio to P = 1, the kernels' programs, and the largest
relative difference of y, h_last and the gradients from P = 1 on the same inputs. A split that
fails to compile or run is an error row.
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from models import mamba as M
from models import scan_kernel
from models.flash_kernel import sm_count
from train import cli

CUDA_MS = {"fwd": 1.19, "fwd+bwd": 1.19 + 4.63}
HBM_BYTES_PER_S = 4.8e12  # H200


def make_inputs(seed, b, s, E, N, dtype):
    """x, B, C ~ N(0, 1); dt = softplus(N(-4, 1)) (about 0.02); A = -(1..N) per channel (S4D-real); D = 1."""
    kx, kdt, kb, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
    return dict(x=jax.random.normal(kx, (b, s, E), dtype),
                dt=jax.nn.softplus(jax.random.normal(kdt, (b, s, E), jnp.float32) - 4.0).astype(dtype),
                A=-jnp.broadcast_to(jnp.arange(1, N + 1, dtype=jnp.float32), (E, N)),
                B=jax.random.normal(kb, (b, s, N), dtype), C=jax.random.normal(kc, (b, s, N), dtype),
                D=jnp.ones((E,), jnp.float32))


def byte_floor_ms(b, s, E, N, dtype):
    """Minimum HBM traffic. Forward: read x, dt [b,s,E] and B, C [b,s,N] once, write y [b,s,E] float32
    once. Backward (states recomputed, nothing saved): read x, dt, B, C and dy [b,s,E] float32 once,
    write dx, ddt [b,s,E] and dB, dC [b,s,N] once (A, D and h_last are negligible)."""
    w = jnp.dtype(dtype).itemsize
    io = 2 * b * s * E * w + 2 * b * s * N * w  # x, dt, B, C
    fwd = io + b * s * E * 4
    bwd = io + b * s * E * 4 + io
    return {"fwd": 1e3 * fwd / HBM_BYTES_PER_S, "fwd+bwd": 1e3 * (fwd + bwd) / HBM_BYTES_PER_S}


def functions(method, **kernel_kw):
    """(forward, forward+backward) jitted for one method; kernel_kw go to the Pallas kernels (sweeps)."""
    def scan(inp):
        if kernel_kw:
            y, h = scan_kernel.selective_scan_pallas(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], **kernel_kw)
            return y + inp["D"] * inp["x"].astype(jnp.float32), h
        return M.selective_scan(**inp, method=method)

    def loss(diff, rest):
        y, h = scan({**rest, **diff})
        return jnp.sum(y) + jnp.sum(h)

    def fwd_bwd(inp):
        diff = {k: inp[k] for k in ("x", "dt", "A", "B", "C")}
        return jax.grad(loss)(diff, {"D": inp["D"]})

    return jax.jit(scan), jax.jit(fwd_bwd)


def median_ms(fn, input_sets, runs):
    for inp in input_sets:  # compile and warm up
        jax.block_until_ready(fn(inp))
    times = []
    for i in range(runs):
        inp = input_sets[i % len(input_sets)]
        start = time.perf_counter()
        jax.block_until_ready(fn(inp))
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def split_table(shapes, splits, runs, dtype, quick):
    """Rows per (shape, P): the Pallas scan with ``seq_splits=P`` (0: auto); returns {(shape, P): max rel err}."""
    kw = dict(chunk=4, block_e=16, bwd_block_e=16) if quick else {}
    defaults = inspect.signature(scan_kernel.selective_scan_pallas).parameters
    be, bbe = (kw.get(name, defaults[name].default) for name in ("block_e", "bwd_block_e"))
    sms = sm_count()
    errs = {}
    print(f"\n{'b x L x E x N':<20}{'splits':>7}{'programs f/b':>14}{'fwd ms':>9}{'f+b ms':>9}"
          f"{'fwd/P1':>8}{'f+b/P1':>8}{'max rel err vs P1':>19}")
    for b, s, E, N in shapes:
        name = f"{b}x{s}x{E}x{N}"
        input_sets = [make_inputs(seed, b, s, E, N, dtype) for seed in range(2 if quick else 3)]
        base, base_t = None, None
        for P in splits:
            pieces = P or (1 if quick else scan_kernel.auto_splits(b, s, E, be, sms))
            label = f"{P}" if P else f"0={pieces}"
            try:
                fwd, fwd_bwd = functions("pallas", seq_splits=P or None, **kw)
                leaves = jax.tree.leaves(jax.device_get((fwd(input_sets[0]), fwd_bwd(input_sets[0]))))
                if base is None and pieces == 1:
                    base = leaves
                err = max(rel_err(a, r) for a, r in zip(leaves, base)) if base is not None else float("nan")
                t = (median_ms(fwd, input_sets, runs), median_ms(fwd_bwd, input_sets, runs))
                if base_t is None and pieces == 1:
                    base_t = t
                ratio = "".join(f"{v / r:>8.2f}" if base_t else f"{'-':>8}" for v, r in zip(t, base_t or t))
                programs = f"{b * pieces * -(-E // be)}/{b * pieces * -(-E // bbe)}"
                print(f"{name:<20}{label:>7}{programs:>14}{t[0]:>9.3f}{t[1]:>9.3f}{ratio}{err:>19.1e}")
                errs[(name, P)] = err
            except Exception as e:  # noqa: BLE001 (an error row, then the next variant)
                msg = str(e).strip().splitlines()[0][:100] if str(e).strip() else ""
                print(f"{name:<20}{label:>7}  error: {type(e).__name__}: {msg}")
                errs[(name, P)] = None
    return errs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape (CPU smoke run)")
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow sequential lax.scan")
    parser.add_argument("--sweep", nargs="?", const="all", choices=("all", "fwd", "bwd"),
                        help="also time pallas block sizes, warps and chunk (of the forward, backward or both)")
    parser.add_argument("--runs", type=int, default=None, help="timed calls per entry (default 20; --quick 2)")
    parser.add_argument("--splits", default=None, help="comma-separated seq_splits (0: auto): only the split table")
    parser.add_argument("--shapes", default="1x32768x2048x16,8x2048x4096x16", help="BxLxExN,... for --splits")
    args = parser.parse_args(argv)
    try:
        shapes = cli.int_list(args.shapes, "--shapes", parts=4)
        splits = None if args.splits is None else cli.int_list(args.splits, "--splits", minimum=0)
    except ValueError as e:
        parser.error(str(e))
    if splits is not None:
        shapes = [(1, 40, 32, 4)] if args.quick else shapes
        print(f"devices: {jax.devices()}  x/dt/B/C bfloat16, A float32")
        return split_table(shapes, splits, args.runs or (1 if args.quick else 20), jnp.bfloat16, args.quick)
    b, s, E, N = (1, 24, 32, 4) if args.quick else (8, 2048, 4096, 16)
    runs = args.runs or (2 if args.quick else 20)
    dtype = jnp.bfloat16
    print(f"devices: {jax.devices()}  shape: b={b} L={s} E={E} N={N}, x/dt/B/C {jnp.dtype(dtype).name}, A float32")
    input_sets = [make_inputs(seed, b, s, E, N, dtype) for seed in range(2 if args.quick else 3)]

    methods = ("chunked", "pallas") if args.skip_reference else ("reference", "chunked", "pallas")
    fns = {m: functions(m) for m in methods}
    if args.quick:  # short kernels interpret and compile faster
        fns["pallas"] = functions("pallas", chunk=4, block_e=16, bwd_block_e=16)
    floor = byte_floor_ms(b, s, E, N, dtype)

    # Correctness first: pallas vs chunked on the same inputs.
    out = {m: jax.device_get(fns[m][0](input_sets[0])) for m in ("chunked", "pallas")}
    grads = {m: jax.device_get(fns[m][1](input_sets[0])) for m in ("chunked", "pallas")}
    errs = {"y": rel_err(out["pallas"][0], out["chunked"][0]), "h_last": rel_err(out["pallas"][1], out["chunked"][1])}
    errs.update({f"d{k}": rel_err(grads["pallas"][k], grads["chunked"][k]) for k in grads["chunked"]})
    print("pallas vs chunked, relative error: " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))

    print(f"\n{'method':<12}{'fwd ms':>10}{'fwd+bwd ms':>12}{'floor fwd':>11}{'floor f+b':>11}"
          f"{'fwd/CUDA':>10}{'f+b/CUDA':>10}")
    for m in methods:
        t = {"fwd": median_ms(fns[m][0], input_sets, runs), "fwd+bwd": median_ms(fns[m][1], input_sets, runs)}
        print(f"{m:<12}{t['fwd']:>10.3f}{t['fwd+bwd']:>12.3f}{floor['fwd']:>11.3f}{floor['fwd+bwd']:>11.3f}"
              f"{t['fwd'] / CUDA_MS['fwd']:>10.2f}{t['fwd+bwd'] / CUDA_MS['fwd+bwd']:>10.2f}")
    print(f"{'CUDA (ref)':<12}{CUDA_MS['fwd']:>10.3f}{CUDA_MS['fwd+bwd']:>12.3f}")
    print(f"(byte floor at {HBM_BYTES_PER_S / 1e12:.1f} TB/s; goal: pallas fwd <= 1.8 ms, fwd+bwd <= 11.6 ms)")

    if args.sweep:  # forward: block_e, num_warps; backward: bwd_block_e, bwd_num_warps; both: chunk, prefetch
        print("\npallas sweep")
        fwd_configs = [(8, 32, 1), (8, 32, 2), (8, 64, 2), (8, 64, 4), (8, 128, 4), (16, 64, 4), (4, 64, 4)]
        bwd_configs = [(8, 8, 1), (8, 16, 1), (8, 32, 1), (4, 16, 1), (16, 16, 1), (8, 16, 2), (8, 32, 2),
                       (8, 32, 4), (8, 64, 4)]
        for prefetch in (False, True):
            for chunk, be, warps in fwd_configs if args.sweep in ("all", "fwd") else ():
                fwd, _ = functions("pallas", chunk=chunk, block_e=be, num_warps=warps, prefetch=prefetch)
                print(f"  fwd      chunk={chunk:<3} block_e={be:<4} warps={warps} prefetch={prefetch:d}: "
                      f"{median_ms(fwd, input_sets, runs):8.3f} ms")
            for chunk, be, warps in bwd_configs if args.sweep in ("all", "bwd") else ():
                _, fwd_bwd = functions("pallas", chunk=chunk, bwd_block_e=be, bwd_num_warps=warps, prefetch=prefetch)
                print(f"  fwd+bwd  chunk={chunk:<3} bwd_block_e={be:<4} warps={warps} prefetch={prefetch:d}: "
                      f"{median_ms(fwd_bwd, input_sets, runs):8.3f} ms")
    return errs


if __name__ == "__main__":
    main()
