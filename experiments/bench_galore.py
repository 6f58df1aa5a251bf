"""GaLore's speed and memory on the 1.26B config (experiments/bench_llama_1b.py), against AdamW, in one job.

    python experiments/bench_galore.py [--ranks 512,256] [--gap 200] [--steps 20] [--warmup 3] [--randomized]
    python experiments/bench_galore.py --ranks 8 --gap 5 --steps 3 --set model.d_model=64 --set model.n_layers=2 \
        --set model.d_ff=128 --set model.vocab_size=512 --set train.seq_len=64 --set model.remat=none   # CPU check

Per optimizer: the train step's median time without a projection refresh (``step s``), the step that
recomputes the projectors (the batched SVD of every selected gradient; timed by setting GaLore's
update counter to a multiple of the gap before each call), the SVD's cost (refresh - plain), the
step averaged over one gap ((refresh + (gap - 1) plain) / gap) and its ratio to AdamW's step, the
optimizer-state bytes of the live arrays, and memory: the compiled step's temporary and argument
bytes (``memory_analysis``) and the process's peak so far (``peak_bytes_in_use``; the GaLore rows
run first, so each row's peak is its own while it exceeds the rows before it). Random tokens,
as in ``train.bench``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bench_llama_1b  # noqa: E402
from parallel import mesh as mesh_lib  # noqa: E402
from parallel import sharding  # noqa: E402
from train import bench, cli, galore  # noqa: E402
from train import config as config_lib  # noqa: E402
from train.setup import setup_training  # noqa: E402


def with_count(opt_state, count: int):
    """``opt_state`` with every GaLoreState's update counter set to ``count`` (same sharding)."""
    def put(node):
        if isinstance(node, galore.GaLoreState):
            return node.replace(count=jax.device_put(np.int32(count), node.count.sharding))
        return node
    return jax.tree.map(put, opt_state, is_leaf=lambda x: isinstance(x, galore.GaLoreState))


def measure(config, steps: int, warmup: int, gap: int) -> dict:
    setup = setup_training(config, mesh_lib.make_mesh(config.mesh))
    batch = sharding.global_batch(bench.random_batch(setup), setup.mesh, setup.rules)
    is_galore = config.optim.name == "galore"
    with sharding.activate(setup.mesh, setup.rules):
        state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(jax.random.PRNGKey(0))
        t0 = time.perf_counter()
        compiled = setup.jit_train_step().lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if is_galore:  # the first call refreshes (count 0); then counts 1.. stay clear of multiples of gap
            state, _ = compiled(state, batch)
        state, m, times = bench._timed(lambda s: compiled(s, batch), state, steps, warmup)
        row = {"step_s": statistics.median(times), "loss": float(m["loss"]), "compile_s": compile_s}
        if is_galore:
            refresh = []
            for k in range(1, steps // 2 + 2):
                state = state.replace(opt_state=with_count(state.opt_state, k * gap))
                jax.block_until_ready(state)
                t = time.perf_counter()
                state, m = compiled(state, batch)
                jax.block_until_ready(m)
                refresh.append(time.perf_counter() - t)
            row["refresh_s"] = statistics.median(refresh[1:])
        stats = jax.devices()[0].memory_stats() or {}
    row["opt_state_gb"] = sum(x.nbytes for x in jax.tree.leaves(state.opt_state)) / 1e9
    row["peak_gb"] = stats.get("peak_bytes_in_use", 0) / 1e9
    row["temp_gb"] = getattr(mem, "temp_size_in_bytes", 0) / 1e9
    row["args_gb"] = getattr(mem, "argument_size_in_bytes", 0) / 1e9
    del state
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="512,256")
    parser.add_argument("--gap", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--randomized", action="store_true", help="also GaLore with the randomized SVD")
    parser.add_argument("--set", action="append", default=[],
                        help="config override section.key=value for every row (e.g. a tiny model for a CPU check)")
    args = parser.parse_args()
    if args.steps < 2 or args.warmup < 0 or args.gap < 1:
        parser.error(f"--steps {args.steps}, --warmup {args.warmup}, --gap {args.gap}: use at least 2 timed steps "
                     "(the refresh's median skips the first), no negative warm-up and a positive gap.")
    try:
        ranks = cli.int_list(args.ranks, "--ranks")
        config = config_lib.override(bench_llama_1b.get_config(), args.set)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    variants = []
    for r in ranks:
        variants.append((f"galore r={r}", dict(galore_rank=r)))
        if args.randomized:
            variants.append((f"galore r={r} rsvd", dict(galore_rank=r, galore_randomized_svd=True)))
    rows = {}
    for name, fields in variants + [("adamw", None)]:
        c = copy.deepcopy(config)
        if fields is not None:
            c.optim.update(name="galore", galore_gap=args.gap, **fields)
        rows[name] = measure(c, args.steps, args.warmup, args.gap)
        print(f"{name}: {rows[name]}", flush=True)
    base = rows["adamw"]["step_s"]
    m, t = c.model, c.train
    print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}; d_model {m.d_model}, "
          f"{m.n_layers} layers, d_ff {m.d_ff}, vocab {m.vocab_size}; batch {t.batch_size} x {t.seq_len}; gap {args.gap}")
    print("| optimizer | step s | refresh step s | SVD s | amortized step s | vs AdamW | opt state GB | "
          "compiled temp GB | compiled args GB | peak GB so far |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        refresh = r.get("refresh_s")
        amort = (refresh + (args.gap - 1) * r["step_s"]) / args.gap if refresh else r["step_s"]
        fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
        print(f"| {name} | {r['step_s']:.4f} | {fmt(refresh)} | {fmt(refresh and refresh - r['step_s'])} | "
              f"{amort:.4f} | {amort / base:.3f}x | {r['opt_state_gb']:.2f} | {r['temp_gb']:.1f} | "
              f"{r['args_gb']:.1f} | {r['peak_gb']:.1f} |")


if __name__ == "__main__":
    main()
