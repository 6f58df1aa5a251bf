"""Ring Attention measurements for one GPU host: the blockwise kernel's speed, and the longest sequence
the 1.26B train step fits per device as the ring grows.

    python experiments/bench_ring.py kernel            # one GPU: blockwise kernel vs cuDNN flash attention
    python experiments/bench_ring.py seqlen            # ahead-of-time: longest sequence for context = 1, 2, 4, 8
    python experiments/bench_ring.py all --out ring.json

On GPUs let the allocator's limit cover the device (it is the default budget of ``seqlen``):
``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95``. Each 1.26B compile takes a while: ``--contexts 1,2`` and
``--contexts 4,8`` in two commands stay within shorter time limits.

kernel: causal attention, bf16, 16 heads of 128, at B4 S8192 and B1 S32768. For each tile size
(block_q = block_k) of ``models/block_attention.py`` (kernel='xla'), for each --pallas variant of the
Pallas kernels of ``models/flash_kernel.py`` (both through ``ring_attention`` without a ring axis: the
custom_vjp forward and backward with the float32 log-sum-exp) and for
``jax.nn.dot_product_attention(implementation='cudnn')``: median forward and forward+backward time
over --reps calls and TFLOP/s (and the same for implementation='xla') (4 B S^2 H D / 2 forward FLOPs for the causal half; 3.5 x that
forward+backward), the ratios of the times to cuDNN's, and the max abs differences of the outputs and
of the gradients (dq, dk, dv) against cuDNN's. A variant that fails (compile error, out of memory)
is an error row. A --pallas variant reads QxKwWsS-KxQwWsS-QxKwWsS, the ``flash_kernel.Config`` of each
kernel: forward (query tile x key step, warps, stages) - dk/dv (key tile x query step, ...) - dq (query
tile x key step, ...); a dq part ``atomic`` (QxKwWsS-KxQwWsS-atomic) takes the fused backward, dq
added atomically by the dk/dv kernel (``Config.fused_dq``), so the old and new backward are timed side
by side; a suffix -gG (``Config.group``) launches
every kernel's programs tile-major over groups of G (batch row, head) pairs, heaviest tiles first.

seqlen: the train step of ``experiments/bench_llama_1b.py`` (1.26B: hidden 2048, 22 layers, vocab
32000) with attention='ring', remat='full', one row per step, compiled ahead of time on the first
N GPUs with mesh.context = N (nothing is run). XLA's memory analysis gives the bytes live per
device (arguments + outputs - aliased + temporaries + code), which is affine in the sequence
length up to the tile scores; two compiles fit the line, its predicted longest length (a multiple
of 2 x N x --multiple) is compiled, and a few more compiles refine it against --hbm_gib (default:
the device's memory limit) to 1/16. Prints per N: the longest length, its bytes per device, tokens
per device, and its growth over context = 1 (the goal: linear).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from train import bench, cli  # noqa: E402

GiB = 1 << 30
# flash_kernel.Config() first (its tiles from the sweep in experiments/BENCHMARKS.md), then the tiles it
# replaced, then the fused backward (dq by atomic adds in the dk/dv kernel, measured 2-3x slower). The
# kernels' choices vary together (backward ms = f+b ms - fwd ms). -g4: the same kernels launched tile-major
# over groups of 4 (batch row, head) pairs.
PALLAS = ("128x64w8s3-128x64w8s3-128x32w8s3,128x64w8s3-128x32w8s3-128x64w8s2,128x64w8s3-128x64w8s3-128x32w8s3-g4,"
          "128x64w8s3-64x64w8s2-atomic")


# ----------------------------------------------------------------------------- kernel speed

def pallas_variants(spec: str) -> list:
    """[(name, flash_kernel.Config)] from a comma-separated list of QxKwWsS-KxQwWsS-QxKwWsS variants."""
    from models import flash_kernel

    out = []
    tile = r"(\d+)x(\d+)w(\d+)s(\d+)"
    for v in filter(None, (x.strip() for x in spec.split(","))):
        m = re.fullmatch(f"{tile}-{tile}-(?:{tile}|(atomic))(?:-g(\\d+))?", v)
        if not m:
            raise SystemExit(f"--pallas variant {v!r} does not read like 128x64w8s3-128x64w8s3-128x32w8s3 (forward, "
                             f"dk/dv and dq kernels: outer tile x inner step, warps, stages; 'atomic' "
                             f"for the dq part: dq added by the dk/dv kernel; a suffix -gG: programs "
                             f"tile-major over groups of G (batch row, head) pairs).")
        *ints, atomic, group = m.groups()
        ints = [int(x) for x in ints if x is not None]
        config = flash_kernel.Config(*ints, fused_dq=atomic or "", group=int(group or 0))
        out.append((v, config))
    return out


def _kernels_only(config):
    """(forward, forward+backward) of the Pallas kernels called directly, without the ring's glue (the
    online-softmax combine of one block, zero-initialised accumulators): o cast to q's dtype; the
    gradients (cast to q's dtype) from the forward's lse and delta = sum(do o)."""
    from models import flash_kernel

    def fwd(q, k, v):
        idx = jnp.arange(q.shape[1])
        return flash_kernel.forward(q, k, v, idx, idx, causal=True, config=config)[0].astype(q.dtype)

    def fwd_bwd(q, k, v, do):
        idx = jnp.arange(q.shape[1])
        o, lse = flash_kernel.forward(q, k, v, idx, idx, causal=True, config=config)
        delta = jnp.sum(do.astype(jnp.float32) * o.astype(q.dtype).astype(jnp.float32), axis=-1)
        grads = flash_kernel.backward(q, k, v, do, lse, delta, idx, idx, causal=True, config=config)
        return tuple(g.astype(q.dtype) for g in grads)

    return fwd, fwd_bwd


def _jax_pallas_mha(q, k, v):
    from jax.experimental.pallas.ops.gpu import attention

    return attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True)


def kernel_table(shapes, blocks, reps: int, dtype=jnp.bfloat16, with_cudnn: bool = True, pallas=(),
                 kernels_only: bool = False) -> list[dict]:
    from parallel import ring_attention as R

    rows = []
    for b, s, h, d in shapes:
        ks = jax.random.split(jax.random.PRNGKey(0), 4)
        q, k, v, cot = (jax.random.normal(key, (b, s, h, d), dtype) for key in ks)
        fwd_flops = 4 * b * s * s * h * d / 2
        impls = {f"blockwise {bq}x{bk}": (lambda q, k, v, bq=bq, bk=bk: R.ring_attention(q, k, v, block_q=bq,
                                                                                          block_k=bk, kernel="xla"))
                 for bq, bk in blocks}
        for name, config in pallas:
            impls[f"pallas {name}"] = lambda q, k, v, config=config: R.ring_attention(q, k, v, kernel=config)
        if kernels_only:
            impls.update({f"kernels {name}": _kernels_only(config) for name, config in pallas})
        impls["xla"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        if with_cudnn:  # on GPU: JAX's own Pallas flash attention (deprecated for tokamax) for comparison
            impls["jax pallas ops mha"] = lambda q, k, v: _jax_pallas_mha(q, k, v)
            impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                          implementation="cudnn")
        ref = ref_grads = None
        for name, attn in impls.items():
            if isinstance(attn, tuple):  # (forward, forward+backward) as they are
                fwd, fwd_bwd = map(jax.jit, attn)
            else:
                fwd = jax.jit(attn)
                fwd_bwd = jax.jit(lambda q, k, v, c, attn=attn: jax.vjp(attn, q, k, v)[1](c))
            try:
                out = fwd(q, k, v)
                grads = fwd_bwd(q, k, v, cot)
                t_f = bench.median_seconds(fwd, q, k, v, reps=reps)
                t_fb = bench.median_seconds(fwd_bwd, q, k, v, cot, reps=reps)
            except Exception as e:  # e.g. out of memory at a large tile
                rows.append(dict(shape=f"B{b} S{s} H{h} D{d}", impl=name, error=str(e).splitlines()[0][:120]))
                continue
            if name == "cudnn" or ref is None and not with_cudnn:
                ref, ref_grads = out, grads
            rows.append(dict(shape=f"B{b} S{s} H{h} D{d}", impl=name, fwd_ms=1e3 * t_f, fwd_bwd_ms=1e3 * t_fb,
                             fwd_tflops=fwd_flops / t_f / 1e12, fwd_bwd_tflops=3.5 * fwd_flops / t_fb / 1e12,
                             out=out, grads=grads))
        diff = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))  # noqa: E731
        for row in rows:
            if "out" in row:
                o, g = row.pop("out"), row.pop("grads")
                row["max_abs_diff"] = None if ref is None else diff(o, ref)
                row["grad_max_abs_diff"] = None if ref is None else max(map(diff, g, ref_grads))
        cudnn = next((r for r in rows if r["impl"] == "cudnn" and r["shape"] == f"B{b} S{s} H{h} D{d}" and
                      "fwd_ms" in r), None)
        for row in rows:
            if cudnn and row["shape"] == cudnn["shape"] and "fwd_ms" in row:
                row["fwd_vs_cudnn"] = row["fwd_ms"] / cudnn["fwd_ms"]
                row["fwd_bwd_vs_cudnn"] = row["fwd_bwd_ms"] / cudnn["fwd_bwd_ms"]
    return rows


def print_kernel(rows):
    print(f"{'shape':<20} {'implementation':<41} {'fwd ms':>9} {'fwd TF/s':>9} {'/ cuDNN':>8} {'f+b ms':>9} "
          f"{'f+b TF/s':>9} {'/ cuDNN':>8} {'max|diff|':>10} {'grad diff':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:<20} {r['impl']:<41} {r['error']}")
            continue
        ratio = lambda key: f"{r[key]:.2f}x" if key in r else "-"  # noqa: E731
        diff = lambda key: f"{r[key]:.2e}" if r.get(key) is not None else "-"  # noqa: E731
        print(f"{r['shape']:<20} {r['impl']:<41} {r['fwd_ms']:9.3f} {r['fwd_tflops']:9.1f} {ratio('fwd_vs_cudnn'):>8} "
              f"{r['fwd_bwd_ms']:9.3f} {r['fwd_bwd_tflops']:9.1f} {ratio('fwd_bwd_vs_cudnn'):>8} "
              f"{diff('max_abs_diff'):>10} {diff('grad_max_abs_diff'):>10}", flush=True)
    for shape in dict.fromkeys(r["shape"] for r in rows):  # the kernels are independent: best of each
        timed = [r for r in rows if r["shape"] == shape and r["impl"].startswith("pallas ") and "fwd_ms" in r]
        if timed:
            fwd = min(timed, key=lambda r: r["fwd_ms"])
            bwd = min(timed, key=lambda r: r["fwd_bwd_ms"] - r["fwd_ms"])
            best = fwd["impl"].split()[1].split("-")[0] + "-" + "-".join(bwd["impl"].split()[1].split("-")[1:])
            print(f"{shape}: fastest Pallas forward {fwd['fwd_ms']:.3f} ms, backward "
                  f"{bwd['fwd_bwd_ms'] - bwd['fwd_ms']:.3f} ms: --pallas {best}")


# ----------------------------------------------------------------------------- longest sequence

def _config(seq_len: int, context: int, model_overrides=None):
    from experiments import bench_llama_1b

    c = bench_llama_1b.get_config()
    c.model.update(attention="ring", remat="full", **(model_overrides or {}))
    c.mesh.update(data=1, context=context)
    c.train.update(batch_size=1, seq_len=seq_len, loss_chunk=0)
    return c


def step_bytes(seq_len: int, context: int, devices, model_overrides=None) -> int:
    """Bytes live per device for one compiled train step (nothing is allocated or run)."""
    from parallel import mesh as mesh_lib
    from parallel import sharding
    from train import aot
    from train.setup import setup_training

    config = _config(seq_len, context, model_overrides)
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices[:context])
    setup = setup_training(config, mesh)
    with sharding.activate(mesh, setup.rules):
        compiled = setup.jit_train_step().lower(setup.abstract_state(), setup.abstract_batch()).compile()
    return aot.live_bytes(compiled.memory_analysis())


def longest(context: int, budget: int, multiple: int, first: int, devices, model_overrides=None, refine: int = 4,
            log=print) -> dict:
    """The longest multiple of 2 x context x ``multiple`` whose step fits ``budget`` bytes per device: two
    compiles fit a line, its prediction is compiled, then up to ``refine`` more compiles extrapolate past
    the longest fitting length or bisect towards the shortest failing one (to 1/16 of it)."""
    unit = 2 * context * multiple
    down = lambda n: max(unit, int(n) // unit * unit)  # noqa: E731
    seen: dict[int, int] = {}

    def measure(n):
        if n not in seen:
            seen[n] = step_bytes(n, context, devices, model_overrides)
            log(f"  context={context}: {n} tokens -> {seen[n] / GiB:.2f} GiB", flush=True)
        return seen[n]

    a_len = down(first * context)
    a, b = measure(a_len), measure(2 * a_len)
    slope = max((b - a) / a_len, 1.0)
    measure(down(a_len + (budget - a) / slope))
    for _ in range(refine):
        fits = sorted(n for n, used in seen.items() if used <= budget)
        lo = fits[-1] if fits else 0
        hi = min((n for n, used in seen.items() if used > budget and n > lo), default=None)
        if hi is None:
            nxt = down(lo + (budget - seen[lo]) / slope)
        elif hi - lo <= max(unit, lo // 16):
            break
        else:
            nxt = down((lo + hi) // 2)
        if nxt in seen:
            break
        measure(nxt)
    fits = [n for n, used in seen.items() if used <= budget]
    best = max(fits) if fits else None
    return dict(context=context, seq_len=best, tokens_per_device=None if best is None else best // context,
                gib_per_device=None if best is None else seen[best] / GiB, budget_gib=budget / GiB,
                bytes_per_token=slope * context)


def print_seqlen(rows):
    print(f"{'context':>7} {'longest seq':>12} {'tokens/device':>14} {'GiB/device':>11} {'of GiB':>7} "
          f"{'vs context=1':>12}")
    base = next((r["seq_len"] for r in rows if r["context"] == 1 and r["seq_len"]), None)
    for r in rows:
        grow = f"{r['seq_len'] / base:.2f}x" if base and r["seq_len"] else "-"
        print(f"{r['context']:>7} {r['seq_len'] or '-':>12} {r['tokens_per_device'] or '-':>14} "
              f"{(r['gib_per_device'] or 0):11.2f} {r['budget_gib']:7.1f} {grow:>12}")


def _budget(hbm_gib: float) -> int:
    if hbm_gib:
        return int(hbm_gib * GiB)
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise SystemExit("the devices report no memory limit; pass --hbm_gib.")
    return int(stats["bytes_limit"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("kernel", "seqlen", "all"))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--blocks", default="256,512,1024,2048", help="tile sizes (block_q = block_k) of the XLA kernel")
    p.add_argument("--pallas", default=PALLAS, help="Pallas kernel variants QxKwWsS-KxQwWsS-QxKwWsS ('' for none)")
    p.add_argument("--shapes", default="4x8192,1x32768", help="BxS pairs (16 heads of 128)")
    p.add_argument("--kernels_only", action="store_true",
                   help="also time each --pallas variant's kernels called directly (rows 'kernels ...'): the "
                        "difference to its 'pallas' row is the ring's glue around one block")
    p.add_argument("--contexts", default="1,2,4,8")
    p.add_argument("--hbm_gib", type=float, default=0.0, help="budget per device (default: its memory limit)")
    p.add_argument("--multiple", type=int, default=512, help="lengths are multiples of 2 x context x this")
    p.add_argument("--first", type=int, default=16384, help="tokens per device of the first fitting compile")
    p.add_argument("--refine", type=int, default=4, help="compiles after the line's prediction, per context")
    p.add_argument("--tiny", action="store_true", help="CPU check of this script: tiny shapes and model")
    p.add_argument("--out", default="", help="write the tables as JSON here")
    args = p.parse_args(argv)

    try:
        blocks, shapes, contexts = (cli.int_list(args.blocks, "--blocks"), cli.int_list(args.shapes, "--shapes", 2),
                                    cli.int_list(args.contexts, "--contexts"))
        cli.out_file(args.out)
    except ValueError as e:
        p.error(str(e))
    out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "n_devices": jax.device_count()}
    print(f"# {out['device']} x {out['n_devices']}, jax {out['jax']}", flush=True)
    if args.what in ("kernel", "all"):
        blocks = [(x, x) for x in blocks]
        shapes = [(b, n, 16, 128) for b, n in shapes]
        pallas = pallas_variants(args.pallas)
        if args.tiny:
            shapes, blocks = [(1, 256, 2, 16)], [(64, 64), (128, 128)]
            pallas = pallas[:1] + [p for p in pallas[1:] if p[1].fused_dq][:1]  # the first fused one too
        out["kernel"] = kernel_table(shapes, blocks, args.reps, with_cudnn=jax.default_backend() == "gpu",
                                     pallas=pallas, kernels_only=args.kernels_only)
        print_kernel(out["kernel"])
    if args.what in ("seqlen", "all"):
        skipped = [n for n in contexts if n > jax.device_count()]
        if skipped:
            print(f"# contexts above the {jax.device_count()} devices skipped: {skipped}", flush=True)
            contexts = [n for n in contexts if n not in skipped]
        budget = _budget(args.hbm_gib)
        model = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128, vocab_size=512) if args.tiny else None
        out["seqlen"] = [longest(n, budget, args.multiple, args.first, jax.devices(), model, args.refine) for n in contexts]
        print_seqlen(out["seqlen"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
