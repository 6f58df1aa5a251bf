"""ORPO vs. SFT alone vs. SFT then DPO, from one base model that has something to unlearn (Hong et al. 2024,
sec. 6, at the arithmetic corpus's scale), at several seeds; tables of held-out accuracy and log odds ratio.

    python -m experiments.orpo_run --root runs/orpo [--seeds 0,1] [--base_steps 1000] [--steps 400]
                                   [--corrupt 0.5] [--dpo_lrs 3e-4,3e-5] [--set section.key=value ...]

Per seed, in ``ROOT/seedS``:
  data/    mix.jsonl (base pretraining: chains of thought, a ``--corrupt`` share with a wrong last step and
           answer), heldout.jsonl (held-out problems, correct), pairs.jsonl / heldout_pairs.jsonl (preference
           pairs of training / held-out problems: chosen correct, rejected corrupted)
  base/    ``orpo_base`` for ``--base_steps`` steps
  orpo/    ``orpo_arith`` from the base, ``--steps`` steps (32 pairs = 64 rows a step), no SFT stage
  sft/     ``orpo_sft`` from the base, ``--steps`` steps of 64 rows
  sft_half/ + dpo_lrX/  ``orpo_sft`` for ``--steps``/2, then ``orpo_dpo`` (32 pairs a step) for ``--steps``/2 at
           each learning rate X of ``--dpo_lrs`` (DPO wants a far smaller one than SFT), with the SFT model as the
           reference (its log-probs written into the pairs' JSONL first: a forward pass over the pairs, not
           counted in the step budget)
Each stage is an ordinary trainer run (``trainer.run``), started from the previous stage's parameters
(``train.init_from``); a rerun resumes or skips finished stages. The tables (stdout and
``ROOT/orpo_table.md``): greedy exact match on held-out problems (``exact_match`` eval, 1-8 operations) and ORPO's
pair metrics on held-out pairs (``train.orpo.evaluate_pairs``: log odds ratio, preference accuracy) for each
method, mean [min, max] over seeds; and ORPO's held-out log odds ratio during training.
"""
from __future__ import annotations

import importlib
import os

from absl import flags

from experiments import jobs
from experiments.jobs import cell

def dpo_label(lr: float) -> str:
    return f"SFT + DPO (lr {lr:g})"


def write_data(directory: str, seed: int, n_mix: int, n_pairs: int, n_heldout: int, corrupt: float) -> dict:
    """The data files of one seed (see the module docstring); returns their paths."""
    from train import cai, data

    os.makedirs(directory, exist_ok=True)
    paths = {k: os.path.join(directory, f"{k}.jsonl") for k in ("mix", "heldout", "pairs", "heldout_pairs")}
    mix, pairs, index = [], [], 0
    while len(mix) < n_mix or len(pairs) < n_pairs:
        pair = data.training_pair(seed, index)
        index += 1
        if pair is None:
            continue
        prompt, chosen, rejected = pair
        bad = data.stable_hash(f"corrupt/{seed}/{index}") % 10_000 < corrupt * 10_000
        if len(mix) < n_mix:
            mix.append({"prompt": prompt, "completion": rejected if bad else chosen})
        if len(pairs) < n_pairs:
            pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    problems = data.eval_problems(seed, n_heldout, 1, data.MAX_STEPS)
    heldout_pairs = [dict(zip(("prompt", "chosen", "rejected"), data.preference_pair(p, seed))) for p in problems]
    cai.write_jsonl(paths["mix"], mix)
    cai.write_jsonl(paths["pairs"], pairs)
    cai.write_jsonl(paths["heldout"], [{"prompt": p.prompt, "completion": p.cot} for p in problems])
    cai.write_jsonl(paths["heldout_pairs"], heldout_pairs)
    return paths


def config(name: str, seed: int, overrides: list[str], **train):
    from train.config import override

    c = importlib.import_module(f"experiments.{name}").get_config()
    c.seed = seed
    c.data.seed = seed
    c.train.update(progress=False, **train)
    return override(c, overrides)


def run_seed(root: str, seed: int, base_steps: int, steps: int, corrupt: float, dpo_lrs: list[float],
             overrides: list[str]) -> dict:
    from train import cai, data, orpo
    import models

    out = os.path.join(root, f"seed{seed}")
    args = dict(base_steps=base_steps, steps=steps, corrupt=corrupt, dpo_lrs=list(dpo_lrs), overrides=list(overrides))
    done = jobs.finished_seed(os.path.join(out, "summary.json"), args)  # a finished seed: nothing rerun
    if done is not None:
        return done
    paths = write_data(os.path.join(out, "data"), seed, n_mix=64 * base_steps, n_pairs=32 * steps, n_heldout=512,
                       corrupt=corrupt)
    half = max(steps // 2, 1)
    every = max(steps // 8, 1)
    base_c = config("orpo_base", seed, overrides, steps=base_steps, exact_match_every=base_steps,
                    eval_every=base_steps)
    base_c.data.update(paths=[paths["mix"]], eval_paths=[paths["heldout"]])
    results = {"base": jobs.stage(base_c, os.path.join(out, "base"))}
    base = os.path.join(out, "base")
    orpo_c = config("orpo_arith", seed, overrides, steps=steps, exact_match_every=steps, eval_every=every)
    results["ORPO"] = jobs.stage(orpo_c, os.path.join(out, "orpo"), base)
    sft_c = config("orpo_sft", seed, overrides, steps=steps, exact_match_every=steps, eval_every=steps)
    results["SFT"] = jobs.stage(sft_c, os.path.join(out, "sft"), base)
    half_c = config("orpo_sft", seed, overrides, steps=half, exact_match_every=half, eval_every=half)
    jobs.stage(half_c, os.path.join(out, "sft_half"), base)
    ref = cai.load_params(half_c, os.path.join(out, "sft_half"))
    model, mcfg = models.get(half_c.model.family), models.get(half_c.model.family).from_config(half_c.model)
    tok = data.make_tokenizer(half_c.data)
    for name in ("pairs", "heldout_pairs"):
        target = paths[name].replace(".jsonl", "_ref.jsonl")
        if not os.path.exists(target):
            orpo.add_reference_logps(model, mcfg, ref, paths[name], target, tok, half_c.train.seq_len, batch_size=64)
    workdirs = {"base": (base_c, "base"), "ORPO": (orpo_c, "orpo"), "SFT": (sft_c, "sft")}
    for lr in dpo_lrs:
        dpo_c = config("orpo_dpo", seed, overrides, steps=half, exact_match_every=half, eval_every=half)
        dpo_c.optim.lr = lr
        dpo_c.data.update(paths=[paths["pairs"].replace(".jsonl", "_ref.jsonl")],
                          eval_paths=[paths["heldout_pairs"].replace(".jsonl", "_ref.jsonl")])
        sub = f"dpo_lr{lr:g}"
        results[dpo_label(lr)] = jobs.stage(dpo_c, os.path.join(out, sub), os.path.join(out, "sft_half"))
        workdirs[dpo_label(lr)] = (dpo_c, sub)
    heldout = data.read_preference_jsonl([paths["heldout_pairs"]])
    for label, (c, sub) in workdirs.items():
        params = cai.load_params(c, os.path.join(out, sub))
        results[label]["pairs"] = orpo.evaluate_pairs(model, mcfg, params, heldout, tok, c.train.seq_len, 64)
    from train import metrics
    results["curve"] = [(r["step"], r["eval_log_odds_ratio"]) for r in metrics.read_jsonl(os.path.join(out, "orpo"))
                        if "eval_log_odds_ratio" in r]
    jobs.save_seed(os.path.join(out, "summary.json"), results, args)
    return results


def tables(per_seed: list[dict], seeds: list[int]) -> str:
    lines = ["| method | held-out exact match (%) | held-out log odds ratio | held-out preference accuracy (%) | "
             "chosen mean log-prob |", "|---|---|---|---|---|"]
    labels = [k for k in per_seed[0] if k != "curve"]
    for label in labels:
        runs = [r[label] for r in per_seed]
        lines.append(f"| {label} | {cell([r['exact_match'] for r in runs])} | "
                     f"{cell([r['pairs']['log_odds_ratio'] for r in runs], 1.0, 3)} | "
                     f"{cell([r['pairs']['accuracy'] for r in runs])} | "
                     f"{cell([r['pairs']['chosen_logp'] for r in runs], 1.0, 4)} |")
    steps = [s for s, _ in per_seed[0]["curve"]]
    lines += ["", "ORPO's held-out log odds ratio during training (mean [min, max] over seeds)", "",
              "| step | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps),
              "| log odds ratio | " + " | ".join(cell([dict(r["curve"])[s] for r in per_seed], 1.0, 3)
                                                 for s in steps) + " |"]
    return f"Seeds {seeds}\n\n" + "\n".join(lines)


def main(argv):
    del argv
    F = flags.FLAGS
    root, seeds = os.path.abspath(F.root), [int(s) for s in F.seeds]
    if not 0 <= F.corrupt <= 1:
        raise ValueError(f"--corrupt is {F.corrupt}; use a share in [0, 1].")
    dpo_lrs = [float(x) for x in F.dpo_lrs]
    per_seed = [run_seed(root, s, F.base_steps, F.steps, F.corrupt, dpo_lrs, F.set) for s in seeds]
    text = tables(per_seed, seeds)
    with open(os.path.join(root, "orpo_table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    flags.DEFINE_string("root", "runs/orpo", "Directory for the runs and the tables.")
    jobs.define_seeds()
    flags.DEFINE_integer("base_steps", 1000, "Steps of base pretraining on the corrupted mix.")
    flags.DEFINE_integer("steps", 400, "Fine-tuning steps of each method (SFT + DPO: half each).")
    flags.DEFINE_float("corrupt", 0.5, "Share of the base mix's chains of thought that are corrupted.")
    jobs.define_lrs("dpo_lrs", ["3e-4", "3e-5"], "DPO's peak learning rates (each its own run from one SFT model).")
    flags.DEFINE_multi_string("set", [], "Config overrides for every stage, as section.key=value.")
    from train import cli

    cli.run(main)
