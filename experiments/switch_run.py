"""Runs the Switch vs. dense experiment (``switch_stdlib`` vs. ``dense_stdlib``) at several seeds
and reports how many steps the Switch model needs to reach the dense model's best eval loss.

    python -m experiments.switch_run --root runs/switch [--seeds 0,1] [--parallel 4] [--set train.steps=1200 ...]

Each (config, seed) trains with the trainer in ``ROOT/NAME/seedS`` (a finished run is not rerun).
Per seed, the dense run's lowest ``eval_loss`` is the target; the Switch run's first eval step at
or below it is its step to reach it, and the dense run's step to its best / that step is the
speedup (Fedus et al. 2021, figure 4: 7x at scale). The table (per seed, and mean [min, max]) goes to stdout and
``ROOT/switch_table.md``; ``ROOT/switch.png`` plots both eval-loss curves and the Switch runs'
per-layer dropped fraction and max expert load (each run's ``moe.png`` has all MoE metrics).
"""
from __future__ import annotations

import os

from absl import flags

from experiments.jobs import cell, define_flags, run_all
from train import metrics

PAIR = ("dense_stdlib", "switch_stdlib")


def _records(root: str, name: str, seed: int) -> list[dict]:
    return metrics.read_jsonl(os.path.join(root, name, f"seed{seed}"))


def steps_to_reach(dense: list[tuple[int, float]], switch: list[tuple[int, float]]) -> dict:
    """The dense run's best eval loss and the step it first got there, the first Switch eval step at
    or below it (None if never) and the speedup dense step / Switch step.

    The best, not the final loss: once a run overfits (eval loss rising in a second epoch), any
    model reaches the dense run's final loss early, and dense would 'speed up' over itself."""
    dense_step, target = min(dense, key=lambda p: (p[1], p[0]))
    reached = next((s for s, v in switch if v <= target), None)
    return {"dense_best": target, "switch_best": min(v for _, v in switch), "dense_step": dense_step,
            "switch_step": reached, "speedup": dense_step / reached if reached else None}


def summarize(root: str, seeds: list[int]) -> str:
    """The markdown table of ``steps_to_reach`` per seed, then mean [min, max] over seeds."""
    rows = {s: steps_to_reach(*(metrics.curve(_records(root, name, s), "eval_loss") for name in PAIR)) for s in seeds}
    lines = ["| seed | dense best eval loss | Switch best eval loss | dense steps to its best "
             "| Switch steps to reach it | speedup |", "|---|---|---|---|---|---|"]
    for s, r in rows.items():
        reach = r["switch_step"] if r["switch_step"] is not None else "not reached"
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"| {s} | {r['dense_best']:.4f} | {r['switch_best']:.4f} | {r['dense_step']} | {reach} "
                     f"| {speed} |")
    vals = list(rows.values())
    speeds = [r["speedup"] for r in vals if r["speedup"]]
    lines.append(f"| mean [min, max] | {cell([r['dense_best'] for r in vals], 1, 4)} | "
                 f"{cell([r['switch_best'] for r in vals], 1, 4)} | | | "
                 + (f"{cell(speeds, 1, 2)}x |" if len(speeds) == len(vals) else "- |"))
    return "\n".join(lines)


def plot(root: str, seeds: list[int]) -> str:
    """ROOT/switch.png: eval loss of both configs, and the Switch layers' dropped fraction and max load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for s in seeds:
        runs = {name: _records(root, name, s) for name in PAIR}
        for (name, records), style in zip(runs.items(), ("--", "-")):
            axes[0].plot(*zip(*metrics.curve(records, "eval_loss")), style, label=f"{name.split('_')[0]} seed {s}")
        switch = runs[PAIR[1]]
        for ax, metric in zip(axes[1:], ("dropped_fraction", "load_max")):
            for key in sorted({k for r in switch for k in r if k.startswith(f"moe/{metric}/")}):
                ax.plot(*zip(*metrics.curve(switch, key)), lw=0.8, label=f"{key.rsplit('/', 1)[1]} seed {s}")
    for ax, title in zip(axes, ("eval loss", "dropped token fraction (train)", "max expert load (share of tokens)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    path = os.path.join(root, "switch.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    root, seeds = os.path.abspath(FLAGS.root), [int(s) for s in FLAGS.seeds]
    run_all([(name, s) for s in seeds for name in PAIR], root, FLAGS.set, FLAGS.parallel)
    text = summarize(root, seeds)
    with open(os.path.join(root, "switch_table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"plot: {plot(root, seeds)}")


if __name__ == "__main__":  # flags here, so that importing this module (tests) defines none
    define_flags("runs/switch")
    from train import cli

    cli.run(main)
