"""GPipe measurements (parallel/pipeline.py): stage re-materialisation, the largest model per stage count, the bubble.

    python experiments/pipeline_memory.py [--part a b c] [--platform cpu|gpu] [--hbm_gb 141]

(a) Peak activation memory of one train step with and without stage re-materialisation
    (pipeline.remat 'none' / 'full', model.remat 'none' / 'full'), from the compiled
    executable's memory analysis (temporaries per device), K = 4 stages, M = 8 micro-batches;
    the activations are the growth of the temporaries from 32 to 64 rows.
(b) The largest Transformer (width 2048, SwiGLU 5632, 16 heads, vocab 32000, sequence 2048,
    16 rows per step, bf16 compute, float32 AdamW state) whose train step fits ``--hbm_gb`` per
    device for K = 1, 2, 4 stages (M = 4K micro-batches; K = 1 is the plain model), found by
    bisection over the layer count with ahead-of-time compilation and memory analysis only:
    nothing runs. The figure is arguments + outputs - aliased + temporaries + code per device.
(c) The bubble: forward + backward of the layer stack pipelined over K stages with M
    micro-batches, against the same stack unpipelined. On ``--platform cpu`` the stages run on
    one device (``--serial``, the default there), so every tick costs all K stages' work and the
    measured overhead 1 - t_plain / t_pipe (process CPU time) is the schedule's idle share plus the
    per-tick costs (loop, slicing the stage weights, the output buffer); with one device per
    stage (GPUs) it is 1 - (t_plain / K) / t_pipe. Both compare with (K - 1) / (V M + K - 1).

On CPU (the default) every part runs on host devices (8 are created); (b) on CPU is an estimate
of the program's memory (XLA's CPU compiler schedules and lays out buffers unlike the GPU's).
On GPU, run with ``--platform gpu`` on a host with 4 GPUs, so that K = 4 gets one GPU per stage.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

PARTS = ("a", "b", "c")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--hbm_gb", type=float, default=141.0, help="per-device budget for (b), in GB (1e9 bytes)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 4], help="K values of (b)")
    p.add_argument("--serial", type=int, default=-1, help="(c): 1 = all stages on one device, 0 = one per stage")
    return p.parse_args(argv)


def _config(*, d_model, n_layers, d_ff, n_heads, vocab, seq, batch, stage, micro, remat="full", model_remat="full",
            dtype="bfloat16", loss_chunk=0):
    from experiments import arith_cot

    c = arith_cot.get_config()
    c.model.update(d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads, d_ff=d_ff,
                   vocab_size=vocab, dtype=dtype, remat=model_remat)
    c.train.update(batch_size=batch, seq_len=seq, loss_chunk=loss_chunk)
    c.mesh.update(data=1, stage=stage)
    c.pipeline.update(microbatches=micro, remat=remat)
    return c


def compile_step(config, devices):
    """(setup, memory analysis) of ``config``'s train step compiled for ``devices`` (nothing runs)."""
    import jax

    from parallel import mesh as mesh_lib
    from parallel import sharding
    from train.setup import setup_training

    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    setup = setup_training(config, mesh)
    with sharding.activate(mesh, setup.rules):
        compiled = setup.jit_train_step().lower(setup.abstract_state(), setup.abstract_batch()).compile()
    del jax
    return setup, compiled.memory_analysis()


def part_a(devices):
    """Temporaries per device at 32 and 64 rows; the activations of 32 rows are their difference
    (what grows with the batch: weights, gradients and optimizer buffers do not)."""
    rows = []
    for model_remat in ("none", "full"):
        for remat in ("none", "full"):
            temps = []
            for batch in (32, 64):
                c = _config(d_model=512, n_layers=16, d_ff=1408, n_heads=8, vocab=4096, seq=512, batch=batch,
                            stage=4, micro=8, remat=remat, model_remat=model_remat, loss_chunk=128)
                _, mem = compile_step(c, devices[:4])
                temps.append(mem.temp_size_in_bytes)
            rows.append((model_remat, remat, temps[0], temps[1] - temps[0]))
            print(f"(a) model.remat={model_remat} pipeline.remat={remat}: {temps}", flush=True)
    print("\n(a) memory per device, K=4 stages, M=8: width 512, 16 layers (4 per stage), vocab 4096, seq 512, bf16 compute")
    print(f"{'model.remat':>12} {'pipeline.remat':>15} {'temporaries, 32 rows MiB':>25} {'activations of 32 rows MiB':>27}")
    for model_remat, remat, temp, act in rows:
        print(f"{model_remat:>12} {remat:>15} {temp / 2**20:25.1f} {act / 2**20:27.1f}")
    return rows


def part_b(devices, hbm_bytes, stages):
    import jax

    from train import aot

    results = []
    for k in stages:
        if k > len(devices):
            print(f"(b) K={k}: skipped, only {len(devices)} devices")
            continue
        micro = 4 * k if k > 1 else 1

        def fits(units):
            c = _config(d_model=2048, n_layers=units * k, d_ff=5632, n_heads=16, vocab=32000, seq=2048, batch=16,
                        stage=k, micro=micro, loss_chunk=512)
            setup, mem = compile_step(c, devices[:k])
            params = sum(x.size for x in jax.tree.leaves(setup.state_shape.params))
            return aot.live_bytes(mem) <= hbm_bytes, params, aot.live_bytes(mem)

        lo, hi, best = 0, 8, None  # units per stage: find the largest that fits
        while True:
            ok, params, total = fits(hi)
            if not ok:
                break
            lo, best, hi = hi, (hi * k, params, total), hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok, params, total = fits(mid)
            if ok:
                lo, best = mid, (mid * k, params, total)
            else:
                hi = mid
        results.append((k, micro, best))
        print(f"(b) K={k}: {best}", flush=True)
    print(f"\n(b) largest model per {hbm_bytes / 1e9:.0f} GB device: width 2048, ffn 5632, seq 2048, 16 rows, "
          f"bf16 compute, float32 AdamW")
    print(f"{'K':>2} {'M':>3} {'layers':>7} {'parameters':>11} {'bytes/device GB':>16}")
    for k, micro, best in results:
        if best is None:
            print(f"{k:>2} {micro:>3} {'none fits':>7}")
        else:
            layers, params, total = best
            print(f"{k:>2} {micro:>3} {layers:>7} {params / 1e9:10.2f}B {total / 1e9:16.1f}")
    return results


def part_c(devices, serial: bool, repeats_list=(1, 2)):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import models
    from parallel import mesh as mesh_lib
    from parallel import pipeline as pl
    from parallel import sharding

    model = models.get("transformer")
    cfg = model.Config(vocab_size=256, d_model=256, n_layers=8, n_heads=4, n_kv_heads=4, d_ff=768, dtype="float32",
                       remat="none")
    params = model.init(cfg, jax.random.PRNGKey(0))["layers"]
    b, s = 32, 128
    x = jax.random.normal(jax.random.PRNGKey(1), (b, s, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))

    def timed(blocks_fn, mesh):
        def loss(p, x):
            return jnp.sum(blocks_fn(p, x, cfg, positions=pos)[0] ** 2)
        f = jax.jit(jax.grad(loss, argnums=(0, 1)))
        def run():
            if mesh is None:
                return jax.block_until_ready(f(params, x))
            with sharding.activate(mesh, sharding.DEFAULT_RULES):
                return jax.block_until_ready(f(params, x))
        run()
        times = []
        for _ in range(5):
            t0 = clock()
            run()
            times.append(clock() - t0)
        return float(np.median(times))

    # Serial: the CPU time of the process (all threads), which counts the work done (bubble ticks
    # included) and is less disturbed by other processes than wall time. One device per stage: wall time.
    clock = time.process_time if serial else time.perf_counter
    t_plain = timed(model.blocks, None)
    rows = []
    for k in (2, 4):
        for v in repeats_list:
            for m in (1, 2, 4, 8):
                if v > 1 and m < k:
                    continue
                mesh = None if serial else mesh_lib.make_mesh({"stage": k, "data": 1}, devices=devices[:k])
                piped = pl.Pipelined(model, stages=k, microbatches=m, repeats=v, remat="none", mesh=mesh)
                t = timed(piped.blocks, mesh)
                measured = 1 - t_plain / t if serial else 1 - (t_plain / k) / t
                rows.append((k, v, m, t, measured, pl.bubble_fraction(k, m, v)))
                print(f"(c) K={k} V={v} M={m}: {t * 1e3:.1f} ms", flush=True)
    where = "one device (all stages)" if serial else "one device per stage"
    print(f"\n(c) bubble, {where}: forward+backward of 8 layers (width 256, 32 x 128 tokens, float32), "
          f"{'CPU' if serial else 'wall'} time; "
          f"unpipelined {t_plain * 1e3:.1f} ms")
    print(f"{'K':>2} {'V':>2} {'M':>3} {'ms':>8} {'measured':>9} {'(K-1)/(VM+K-1)':>15} {'useful-work speed':>18}")
    for k, v, m, t, measured, theory in rows:  # last: (1 - measured) / (1 - formula), 1 = no cost but the bubble
        print(f"{k:>2} {v:>2} {m:>3} {t * 1e3:8.1f} {measured:9.3f} {theory:15.3f} {(1 - measured) / (1 - theory):18.2f}")
    return rows


def main(argv=None):
    args = _args(argv)
    if args.platform == "cpu":
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    devices = jax.devices()
    print(f"devices: {len(devices)} x {devices[0].device_kind}, jax {jax.__version__}", flush=True)
    if "a" in args.part:
        part_a(devices)
    if "b" in args.part:
        part_b(devices, int(args.hbm_gb * 1e9), args.stages)
    if "c" in args.part:
        part_c(devices, serial=(args.platform == "cpu") if args.serial < 0 else bool(args.serial))


if __name__ == "__main__":
    main()
