"""Runs Mamba vs. the Transformer on the arithmetic corpus (``mamba_arith`` vs. ``arith_cot``, about
equal parameters, the same data, steps and batch) at several seeds, and tabulates greedy exact
match per operation count.

    python -m experiments.arith_run --root runs/arith [--seeds 0,1] [--parallel 4] [--set train.steps=...]

Each (config, seed) trains in ``ROOT/NAME/seedS`` and is evaluated with ``python -m train.evaluate
--task exact_match``; the table (exact match in %, mean over seeds [min, max], one column per
operation count and the overall mean) goes to stdout and ``ROOT/arith_table.md``.
"""
from __future__ import annotations

import os

from absl import flags

from experiments.jobs import cell, define_flags, run_all

PAIR = (("Mamba", "mamba_arith"), ("Transformer", "arith_cot"))


def table(results: dict[str, list[dict]]) -> str:
    """``results[label]``: one exact_match result dict per seed; columns are the operation counts."""
    first = next(iter(results.values()))[0]
    ops = sorted(int(k.split("/")[1]) for k in first if k.startswith("exact_match/"))
    lines = ["| model | " + " | ".join(str(n) for n in ops) + " | all |", "|---|" + "---|" * (len(ops) + 1)]
    for label, runs in results.items():
        lines.append(f"| {label} | " + " | ".join(cell([r[f"exact_match/{n}"] for r in runs]) for n in ops)
                     + f" | {cell([r['exact_match'] for r in runs])} |")
    return "\n".join(lines)


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    root, seeds = os.path.abspath(FLAGS.root), [int(s) for s in FLAGS.seeds]
    results = run_all([(name, s) for _, name in PAIR for s in seeds], root, FLAGS.set, FLAGS.parallel,
                      eval_task="exact_match")
    text = ("Greedy exact match (%) per operation count, mean over seeds "
            f"{seeds} [min, max]\n\n" + table({label: [results[(name, s)] for s in seeds] for label, name in PAIR}))
    with open(os.path.join(root, "arith_table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":  # flags here, so that importing this module (tests) defines none
    define_flags("runs/arith")
    from train import cli

    cli.run(main)
