"""Runs the chain-of-thought experiments (a), (b), (c) at several seeds and prints their tables.

    python -m experiments.cot_run --root runs/cot [--seeds 0,1] [--parallel 6] [--set train.steps=10 ...]

For every experiment config (``cot_prompting``, ``cot_trained``, ``cot_direct``) and seed, one
job trains with the trainer (``python -m train``, resuming any checkpoint in its workdir) and
then evaluates with ``python -m train.evaluate --task cot`` into ``ROOT/NAME/seedS/cot.json``.
Jobs run ``--parallel`` at a time (one GPU shares its memory among them). The tables (mean
over seeds and [min, max]) go to stdout and ``ROOT/cot_tables.md``:

  (a) prompting: one mixture-trained model, few-shot standard vs. few-shot chain-of-thought prompts;
  (b) training: direct-trained vs. CoT-trained at equal packed training tokens, zero-shot;
  (c) self-consistency: the CoT-trained model, greedy vs. majority of k samples.
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import flags

from experiments.jobs import cell, define_flags, run_all
from train.config import override

EXPERIMENTS = ("cot_prompting", "cot_trained", "cot_direct")

def table(title: str, columns: list[tuple[str, list[dict], str]], steps, trained_max: int) -> str:
    """Rows per step count; columns (header, results per seed, key prefix); the last column is the
    difference of the last two columns' means, in points."""
    head = ["operations", *(c[0] for c in columns), f"{columns[-1][0]} - {columns[-2][0]} (points)"]
    rows = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in [*steps, "mean"]:
        means = []
        cells = []
        for _, results, key in columns:
            values = [r[f"{key}/{s}"] for r in results]
            means.append(100 * float(np.mean(values)))
            cells.append(cell(values))
        label = f"{s}" + (" (beyond training)" if isinstance(s, int) and s > trained_max else "")
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {means[-1] - means[-2]:+.1f} |")
    return "\n".join(rows)


def main(argv):
    del argv
    from experiments import cot_prompting, cot_trained

    FLAGS = flags.FLAGS
    root = os.path.abspath(FLAGS.root)
    seeds = [int(s) for s in FLAGS.seeds]
    start = time.perf_counter()
    results = run_all([(name, seed) for name in EXPERIMENTS for seed in seeds], root, FLAGS.set, FLAGS.parallel,
                      eval_task="cot")
    by = {name: [results[(name, s)] for s in seeds] for name in EXPERIMENTS}

    config, trained = (override(m.get_config(), FLAGS.set) for m in (cot_prompting, cot_trained))  # as the jobs ran
    t, k = config.train, trained.cot.k
    steps = sorted({int(key.rsplit("/", 1)[1]) for key in by["cot_trained"][0] if key.rpartition("/")[2].isdigit()})
    trained_max = config.data.max_steps
    tokens = t.steps * t.batch_size * t.seq_len
    header = (f"Held-out accuracy (%), mean over seeds {seeds} [min, max]; "
              f"up to {config.cot.n} problems per operation count (" + ", ".join(
                  f"{s}: {by['cot_trained'][0][f'n/{s}']}" for s in steps) + "); every arm trained "
              f"on {tokens / 1e6:.1f}M packed tokens ({t.steps} steps x {t.batch_size} x {t.seq_len}); "
              f"training problems have {config.data.min_steps}-{trained_max} operations.")
    tables = [
        header,
        table(f"(a) prompting: mixture-trained model, {config.cot.shots}-shot", [
            ("standard prompt", by["cot_prompting"], "standard/greedy"),
            ("chain-of-thought prompt", by["cot_prompting"], "cot/greedy")], steps, trained_max),
        table("(b) training at equal tokens, zero-shot, greedy", [
            ("direct-trained", by["cot_direct"], "standard/greedy"),
            ("CoT-trained", by["cot_trained"], "cot/greedy")], steps, trained_max),
        table(f"(c) self-consistency, CoT-trained model, k = {k} at temperature {trained.cot.temperature}", [
            ("one sample (maj@1)", by["cot_trained"], "cot/maj@1"),
            ("greedy", by["cot_trained"], "cot/greedy"),
            (f"majority of {k} (maj@{k})", by["cot_trained"], f"cot/maj@{k}")], steps, trained_max),
        "Wall time per job (train + eval, s): " + ", ".join(
            f"{name} {np.mean([r.get('train_s', 0) + r.get('eval_s', 0) for r in by[name]]):.0f}"
            for name in EXPERIMENTS) + f"; all jobs {time.perf_counter() - start:.0f} s with {FLAGS.parallel} at once.",
    ]
    text = "\n\n".join(tables) + "\n"
    with open(os.path.join(root, "cot_tables.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":  # flags here, so that importing this module (tests) defines none
    define_flags("runs/cot")
    from train import cli

    cli.run(main)
