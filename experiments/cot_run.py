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

import concurrent.futures
import os
import time

import numpy as np
from absl import app, flags

from experiments.jobs import cell, job

EXPERIMENTS = ("cot_prompting", "cot_trained", "cot_direct")

_ROOT = flags.DEFINE_string("root", "runs/cot", "Directory for the runs and the tables.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (config.seed) of every experiment.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Jobs at once.")
_SET = flags.DEFINE_multi_string("set", [], "Config overrides for every job, as section.key=value.")


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

    root = os.path.abspath(_ROOT.value)
    seeds = [int(s) for s in _SEEDS.value]
    jobs = [(name, seed) for name in EXPERIMENTS for seed in seeds]
    fraction = 0.9 / max(_PARALLEL.value, 1)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(_PARALLEL.value) as pool:
        futures = {jb: pool.submit(job, *jb, root, _SET.value, fraction, eval_task="cot") for jb in jobs}
        results = {jb: f.result() for jb, f in futures.items()}
    by = {name: [results[(name, s)] for s in seeds] for name in EXPERIMENTS}

    config = cot_prompting.get_config()
    for o in _SET.value:  # the budget as the jobs ran it
        key, value = o.split("=", 1)
        section, field = key.split(".", 1)
        if (section, field) in (("train", "steps"), ("train", "batch_size"), ("train", "seq_len"), ("cot", "n")):
            config[section][field] = int(value)
    t, k = config.train, cot_trained.get_config().cot.k
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
        table(f"(c) self-consistency, CoT-trained model, k = {k} at temperature "
              f"{cot_trained.get_config().cot.temperature}", [
            ("one sample (maj@1)", by["cot_trained"], "cot/maj@1"),
            ("greedy", by["cot_trained"], "cot/greedy"),
            (f"majority of {k} (maj@{k})", by["cot_trained"], f"cot/maj@{k}")], steps, trained_max),
        "Wall time per job (train + eval, s): " + ", ".join(
            f"{name} {np.mean([r.get('train_s', 0) + r.get('eval_s', 0) for r in by[name]]):.0f}"
            for name in EXPERIMENTS) + f"; all jobs {time.perf_counter() - start:.0f} s with {_PARALLEL.value} at once.",
    ]
    text = "\n\n".join(tables) + "\n"
    with open(os.path.join(root, "cot_tables.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
