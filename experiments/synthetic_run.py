"""Runs the Mamba vs. Transformer synthetic-task experiments at several seeds and tabulates
accuracy per evaluation length (Gu & Dao 2023, section 4.1: trained at length 256).

    python -m experiments.synthetic_run --root runs/synthetic [--tasks induction,selective_copying]
        [--seeds 0,1] [--parallel 8] [--set train.steps=...]

For every task, family (``mamba_TASK``, ``transformer_TASK``) and seed, one job trains with the
trainer and evaluates with ``python -m train.evaluate --task length_generalization`` into
``ROOT/NAME/seedS/length_generalization.json``. One table per task (exact-match accuracy in %,
mean over seeds [min, max], per length) goes to stdout and ``ROOT/synthetic_tables.md``.
"""
from __future__ import annotations

import importlib
import os

from absl import flags

from experiments.jobs import cell, define_flags, run_all
from train.config import override

FAMILIES = ("mamba", "transformer")


def table(task: str, results: dict[str, list[dict]], train_length: int = 256) -> str:
    """Rows per evaluation length; ``results[family]`` holds one length_generalization dict per seed."""
    lengths = sorted({int(k.split("/")[1]) for r in results[FAMILIES[0]] for k in r
                      if k.startswith("accuracy/") and k.split("/")[1].isdigit()})
    lines = [f"**{task}** (exact match, %; trained at length {train_length})", "",
             "| length | " + " | ".join(FAMILIES) + " |", "|---|" + "---|" * len(FAMILIES)]
    for n in lengths:
        label = f"{n} (training length)" if n == train_length else str(n)
        lines.append(f"| {label} | " + " | ".join(cell([r[f"accuracy/{n}"] for r in results[f]]) for f in FAMILIES)
                     + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    root, seeds = os.path.abspath(FLAGS.root), [int(s) for s in FLAGS.seeds]
    jobs = [(f"{family}_{task}", s) for task in FLAGS.tasks for family in FAMILIES for s in seeds]
    results = run_all(jobs, root, FLAGS.set, FLAGS.parallel, eval_task="length_generalization")
    text = "\n\n".join(table(task, {f: [results[(f"{f}_{task}", s)] for s in seeds] for f in FAMILIES},
                             override(importlib.import_module(f"experiments.mamba_{task}").get_config(),
                                      FLAGS.set).data.task_length)
                       for task in FLAGS.tasks) + "\n"
    with open(os.path.join(root, "synthetic_tables.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":  # flags here, so that importing this module (tests) defines none
    define_flags("runs/synthetic")
    flags.DEFINE_list("tasks", ["induction", "selective_copying"], "Tasks (experiments/mamba_TASK.py).")
    from train import cli

    cli.run(main)
