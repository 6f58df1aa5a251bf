"""Time the selective-scan forward on one GPU: the Pallas Triton kernel against the Mosaic GPU prototype.

    python -m experiments.bench_scan_mosaic                 # b8 L2048 E4096 N16 and b1 L32768 E2048 N16, bf16
    python -m experiments.bench_scan_mosaic --chunks 4,8,16 --runs 50
    python -m experiments.bench_scan_mosaic --quick         # tiny shape, CPU (both kernels interpreted)

Needs jax >= 0.11 (``models/scan_kernel_mosaic.py``). Forward only: (y, h_last) without gradient, no resets,
h0 = 0. Rows: 'triton P=1' (``selective_scan_pallas``, block_e 64, 4 warps, chunk 8, no sequence split: the
same grid as the prototype), 'triton auto' (its default sequence split), 'mosaic chunk=c' (one
warpgroup per (row, 64 channels)), and the first chunk again with the store barriers Mosaic GPU inserts
by default ('barriers') or with ``ex2.approx.ftz`` for exp2 ('approx_math'). Each time is the median of
``--runs`` calls after a warm-up, rotating among 3 input sets; the error column is the largest relative
error of y and h_last against 'triton P=1' on the same inputs. A variant that fails to compile or run is
an error row (its message is the finding).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from experiments.bench_mamba_scan import make_inputs, median_ms, rel_err
from models import scan_kernel
from models import scan_kernel_mosaic


def variants(chunks, quick):
    """(label, channels per program or None (auto split), function of an input dict -> (y, h_last))."""
    kw = dict(chunk=4, block_e=16) if quick else {}
    be = kw.get("block_e", 64)

    def triton(P):
        return lambda inp: scan_kernel.selective_scan_pallas(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],
                                                             seq_splits=P, **kw)

    def mosaic(c, **kw):
        return lambda inp: scan_kernel_mosaic.selective_scan_mosaic(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],
                                                                    chunk=c, **kw)

    out = [("triton P=1", be, triton(1))] + ([] if quick else [("triton auto", None, triton(None))])
    out += [(f"mosaic chunk={c}", scan_kernel_mosaic.BLOCK_E, mosaic(c)) for c in chunks]
    return out + [(f"mosaic chunk={chunks[0]} {name}", scan_kernel_mosaic.BLOCK_E, mosaic(chunks[0], **{name: True}))
                  for name in ("barriers", "approx_math")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shape (CPU smoke run, interpreted kernels)")
    parser.add_argument("--shapes", default="8x2048x4096x16,1x32768x2048x16", help="BxLxExN,...")
    parser.add_argument("--chunks", default="8,16", help="comma-separated unrolled steps per loop iteration (mosaic)")
    parser.add_argument("--runs", type=int, default=None, help="timed calls per entry (default 20; --quick 1)")
    args = parser.parse_args(argv)
    if not scan_kernel_mosaic.AVAILABLE:
        raise SystemExit(f"jax {jax.__version__}: the Mosaic GPU prototype needs jax >= 0.11.")
    shapes = [(1, 16, 64, 8)] if args.quick else [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    chunks = [4] if args.quick else [int(c) for c in args.chunks.split(",")]
    runs = args.runs or (1 if args.quick else 20)
    print(f"jax {jax.__version__}  devices: {jax.devices()}  x/dt/B/C bfloat16, A float32, forward only")
    print(f"\n{'b x L x E x N':<20}{'kernel':<28}{'programs':>9}{'fwd ms':>10}{'vs triton P=1':>15}{'max rel err':>13}")
    results = {}
    for b, s, E, N in shapes:
        name = f"{b}x{s}x{E}x{N}"
        input_sets = [make_inputs(seed, b, s, E, N, jnp.bfloat16) for seed in range(2 if args.quick else 3)]
        base = base_t = None
        for label, per_program, fn in variants(chunks, args.quick):
            try:
                f = jax.jit(fn)
                out = jax.device_get(f(input_sets[0]))
                base = out if base is None else base
                err = max(rel_err(a, r) for a, r in zip(out, base))
                t = median_ms(f, input_sets, runs)
                base_t = t if base_t is None else base_t
                programs = "auto" if per_program is None else b * E // per_program
                print(f"{name:<20}{label:<28}{programs!s:>9}{t:>10.3f}{t / base_t:>15.2f}{err:>13.1e}")
                results[(name, label)] = (t, err)
            except Exception as e:  # noqa: BLE001 (an error row, then the next variant)
                msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
                print(f"{name:<20}{label:<28}  error: {type(e).__name__}: {msg}")
                results[(name, label)] = None
    return results


if __name__ == "__main__":
    main()
