"""Constitutional AI end to end on arithmetic, with a constitution a program can check
(``experiments/constitutions/arith.json``: "correct" arithmetic and the "format" 'The answer is N.'), at several
seeds; a table of the checked metric per stage and of the AI feedback's and preference model's agreement
with the program.

    python -m experiments.cai_run --root runs/cai [--seeds 0,1] [--base_steps 1500] [--prompts 2048]
                                  [--ppo_steps 100] [--set section.key=value ...]

Per seed, in ``ROOT/seedS`` (each stage reads and writes files; a rerun resumes or skips finished stages):
  data/corpus.jsonl  the templated formats (``train.cai.format_corpus``) over training problems
  base/              ``cai_base``: the base model
  data/sl.jsonl      SL-CAI (``train.cai.critique_revise``): for ``--prompts`` new training questions, a sampled
                     initial response from the base model, one round of critique and revision under a random
                     principle (greedy)
  sl/                ``cai_sl``: the base model fine-tuned on the final revisions (SL_EPOCHS = 2 passes; at
                     ~100 passes the SL model's two samples per question were equal for 1023 of 1024 questions)
  data/rl.jsonl      RL-CAI labels (``train.cai.feedback_labels``): two samples of the SL model per question,
                     labeled by the base model as feedback model (soft labels, 2 principles per pair)
  pm/                ``cai_pm``: the preference model (soft-label Bradley-Terry), from the SL model
  rl/                ``cai_rl``: ORPO on the AI-labeled pairs from the SL model (the open recipes' cheaper route)
  ppo/               ``cai_ppo``: PPO of the SL model against the preference model (``train.ppo``), ``--ppo_steps``
                     iterations of 64 rollouts (0 skips it)
Reported: on 256 held-out questions, the share of responses the program accepts ("correct" and "format", and
both), greedy and sampled at temperature 1, for base, SL-CAI and RL-CAI; the AI labels' agreement with the
program on the RL pairs the program separates (label > 0.5 where the program prefers A); and the preference
model's agreement on held-out response pairs the program separates (flawed vs. good responses).
"""
from __future__ import annotations

import importlib
import math
import os

import numpy as np
from absl import flags

from experiments import jobs
from experiments.jobs import cell

CONSTITUTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "constitutions", "arith.json")
SL_EPOCHS = 2  # SL-CAI passes over its revisions: more make the policy's samples collapse to one response
STAGES = (("base", "cai_base"), ("SL-CAI", "cai_sl"), ("RL-CAI (ORPO on AI labels)", "cai_rl"))


def config(name: str, seed: int, overrides: list[str], **train):
    from train.config import override

    c = importlib.import_module(f"experiments.{name}").get_config()
    c.seed = seed
    c.data.seed = seed
    c.train.update(progress=False, **train)
    return override(c, [o for o in overrides if o.split(".", 1)[0] in c])  # e.g. ppo.* only where there is one


def stage(c, workdir: str, start: str = ""):
    """``jobs.stage``, then the run's parameters."""
    from train import cai

    jobs.stage(c, workdir, start)
    return cai.load_params(c, workdir)


def problems(seed: int, start: int, n: int):
    """``n`` training problems from index ``start`` on (held-out questions skipped)."""
    from train import data

    out, index = [], start
    while len(out) < n:
        p = data.training_problem(seed, index)
        index += 1
        if p is not None:
            out.append(p)
    return out


def checked(generator, heldout, seed: int) -> dict[str, float]:
    """The program's acceptance of greedy and sampled responses to held-out problems."""
    from train import cai

    out = {}
    for mode, sample in (("greedy", False), ("sampled", True)):
        responses = generator.generate([cai.conversation(cai.human_text(p), "") for p in heldout], sample=sample,
                                       seed=seed)
        verdicts = [cai.check_response(p, r.strip()) for p, r in zip(heldout, responses)]
        for key in ("correct", "format"):
            out[f"{mode}/{key}"] = float(np.mean([v[key] for v in verdicts]))
        out[f"{mode}/both"] = float(np.mean([v["correct"] and v["format"] for v in verdicts]))
    return out


def score(problem, response: str) -> int:
    from train import cai

    return sum(cai.check_response(problem, response).values())


def pm_agreement(model, mcfg, params, tokenizer, reward_token: int, heldout, seed: int, seq_len: int) -> float:
    """Share of held-out response pairs (good vs. each flawed response) that the preference model orders as the
    program does (reward read at the response's last token, as in training)."""
    import jax
    import jax.numpy as jnp

    from train import cai, orpo

    texts = []
    for p in heldout:
        responses = cai.flawed_responses(p, seed)
        for kind in ("wrong", "unformatted", "both"):
            texts.append((cai.conversation(cai.human_text(p), ""), responses["good"], responses[kind]))
    rows, last = [], []
    for prompt, *pair in texts:
        for r in pair:
            ids = [tokenizer.bos_id] + tokenizer.encode(prompt) + tokenizer.encode(r)
            rows.append(ids[:seq_len])
            last.append(min(len(ids), seq_len) - 1)
    tokens = np.full((len(rows), seq_len), tokenizer.pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    fn = jax.jit(lambda p, t, l: orpo.sequence_rewards(model, mcfg, p, t, l, reward_token))
    rewards = np.concatenate([np.asarray(fn(params, jnp.asarray(tokens[i:i + 64]), jnp.asarray(last[i:i + 64])))
                              for i in range(0, len(rows), 64)])
    return float(np.mean(rewards[0::2] > rewards[1::2]))


def run_seed(root: str, seed: int, base_steps: int, n_prompts: int, n_heldout: int, overrides: list[str],
             ppo_steps: int = 0) -> dict:
    import models
    from train import cai, data

    out = os.path.join(root, f"seed{seed}")
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    f = lambda name: os.path.join(out, "data", name)  # noqa: E731
    constitution = cai.load_constitution(CONSTITUTION)
    summary_path = os.path.join(out, "summary.json")
    args = dict(base_steps=base_steps, n_prompts=n_prompts, n_heldout=n_heldout, overrides=list(overrides),
                ppo_steps=ppo_steps)
    done = jobs.finished_seed(summary_path, args)  # a finished seed: nothing rerun
    if done is not None:
        return done
    base_c = config("cai_base", seed, overrides, steps=base_steps, eval_every=base_steps)
    if not os.path.exists(f("corpus.jsonl")):
        n = 64 * base_steps // 4 + 1
        cai.write_jsonl(f("corpus.jsonl"), cai.format_corpus(constitution, seed, range(n)))
        cai.write_jsonl(f("corpus_eval.jsonl"), cai.format_corpus(constitution, seed, range(1 << 32, (1 << 32) + 64)))
    base_c.data.update(paths=[f("corpus.jsonl")], eval_paths=[f("corpus_eval.jsonl")])
    base = stage(base_c, os.path.join(out, "base"))
    model, mcfg = models.get(base_c.model.family), models.get(base_c.model.family).from_config(base_c.model)
    tok = data.make_tokenizer(base_c.data)
    gen = lambda params: cai.ModelGenerator(model, mcfg, params, tok, max_new_tokens=80, batch_size=256)  # noqa: E731
    heldout = [p for k in range(1, 9) for p in data.heldout_problems(k, n_heldout // 8, seed)]
    results = {"base": checked(gen(base), heldout, seed)}

    prompts = [cai.human_text(p) for p in problems(seed, 1 << 30, n_prompts)]
    if not os.path.exists(f("sl.jsonl")):
        records = cai.critique_revise(prompts, constitution, gen(base), rounds=1, seed=seed, use_few_shot=False,
                                      sample_initial=True)
        cai.write_jsonl(f("sl.jsonl"), records)
        cai.write_jsonl(f("sl_pairs.jsonl"), cai.revision_pairs(records))  # the extension; not trained on here
    sl_records = cai.read_jsonl(f("sl.jsonl"))
    by_text = {cai.human_text(p): p for p in problems(seed, 1 << 30, n_prompts)}
    results["sl_data"] = {
        "initial_both": float(np.mean([score(by_text[r["human"]], r["initial"]) == 2 for r in sl_records])),
        "revision_both": float(np.mean([score(by_text[r["human"]], r["completion"]) == 2 for r in sl_records]))}
    sl_c = config("cai_sl", seed, overrides)
    sl_c.data.update(paths=[f("sl.jsonl")], eval_paths=[f("sl.jsonl")])
    if not any(o.startswith("train.steps=") for o in overrides):  # SL_EPOCHS over the revisions, packed
        tokens = sum(len(tok.encode(r["prompt"] + r["completion"])) + 2 for r in sl_records)
        sl_c.train.steps = sl_c.train.eval_every = max(1, math.ceil(
            SL_EPOCHS * tokens / (sl_c.train.batch_size * sl_c.train.seq_len)))
    sl = stage(sl_c, os.path.join(out, "sl"), os.path.join(out, "base"))
    results["SL-CAI"] = checked(gen(sl), heldout, seed)

    if not os.path.exists(f("rl.jsonl")):
        labeled = cai.feedback_labels(prompts, constitution, gen(sl), gen(base), seed=seed, principles_per_pair=2)
        pairs = cai.labeled_pairs(labeled)
        cut = max(len(pairs) // 16, 1)
        cai.write_jsonl(f("rl.jsonl"), pairs[cut:])
        cai.write_jsonl(f("rl_eval.jsonl"), pairs[:cut])
        results["rl_pairs_dropped"] = len(labeled) - len(pairs)
    rl_pairs = cai.read_jsonl(f("rl.jsonl")) + cai.read_jsonl(f("rl_eval.jsonl"))
    separated = [(r["label"], score(by_text[r["prompt"][len("Human: "):-len("\n\nAssistant: ")]], r["chosen"]) -
                  score(by_text[r["prompt"][len("Human: "):-len("\n\nAssistant: ")]], r["rejected"]))
                 for r in rl_pairs]
    separated = [(y, d) for y, d in separated if d != 0]
    results["ai_label_agreement"] = (float(np.mean([(y > 0.5) == (d > 0) for y, d in separated])) if separated
                                     else float("nan"))
    results["ai_label_pairs_separated"] = len(separated)

    pm_c = config("cai_pm", seed, overrides)
    pm_c.data.update(paths=[f("rl.jsonl")], eval_paths=[f("rl_eval.jsonl")])
    pm = stage(pm_c, os.path.join(out, "pm"), os.path.join(out, "sl"))
    results["pm_agreement"] = pm_agreement(model, mcfg, pm, tok, pm_c.train.reward_token, heldout, seed,
                                           pm_c.train.seq_len)
    rl_c = config("cai_rl", seed, overrides)
    rl_c.data.update(paths=[f("rl.jsonl")], eval_paths=[f("rl_eval.jsonl")])
    rl = stage(rl_c, os.path.join(out, "rl"), os.path.join(out, "sl"))
    results["RL-CAI (ORPO on AI labels)"] = checked(gen(rl), heldout, seed)
    if ppo_steps:
        from train import ppo
        cai.write_jsonl(f("prompts.jsonl"), [{"prompt": cai.conversation(q, "")} for q in prompts])
        ppo_c = config("cai_ppo", seed, overrides)
        ppo_c.train.update(steps=ppo_steps, ckpt_every=ppo_steps, eval_every=0)
        ppo_c.ppo.update(prompts=f("prompts.jsonl"), policy_workdir=os.path.join(out, "sl"),
                         pm_workdir=os.path.join(out, "pm"), reward_token=pm_c.train.reward_token)
        ppo.run(ppo_c, os.path.join(out, "ppo"))
        results["RL-CAI (PPO)"] = checked(gen(cai.load_params(ppo_c, os.path.join(out, "ppo"))), heldout, seed)
    jobs.save_seed(summary_path, results, args)
    return results


def table(per_seed: list[dict], seeds: list[int]) -> str:
    cols = [f"{m}/{k}" for m in ("greedy", "sampled") for k in ("correct", "format", "both")]
    lines = ["| stage | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label in [s for s, _ in STAGES] + ["RL-CAI (PPO)"]:
        if label not in per_seed[0]:
            continue
        lines.append(f"| {label} | " + " | ".join(cell([r[label][c] for r in per_seed]) for c in cols) + " |")
    lines += ["", "| measure | value (%) |", "|---|---|",
              f"| SL-CAI data: initial responses accepted | {cell([r['sl_data']['initial_both'] for r in per_seed])} |",
              f"| SL-CAI data: revisions accepted | {cell([r['sl_data']['revision_both'] for r in per_seed])} |",
              f"| AI feedback labels agreeing with the program | {cell([r['ai_label_agreement'] for r in per_seed])} |",
              "| preference model agreeing with the program (held out) | "
              f"{cell([r['pm_agreement'] for r in per_seed])} |"]
    return (f"Share of held-out responses the program accepts (%), mean [min, max] over seeds {seeds}\n\n"
            + "\n".join(lines))


def main(argv):
    del argv
    F = flags.FLAGS
    root, seeds = os.path.abspath(F.root), [int(s) for s in F.seeds]
    per_seed = [run_seed(root, s, F.base_steps, F.prompts, F.heldout, F.set, F.ppo_steps) for s in seeds]
    text = table(per_seed, seeds)
    with open(os.path.join(root, "cai_table.md"), "w") as fh:
        fh.write(text + "\n")
    print(text)


if __name__ == "__main__":
    flags.DEFINE_string("root", "runs/cai", "Directory for the runs and the tables.")
    jobs.define_seeds()
    flags.DEFINE_integer("base_steps", 1500, "Steps of base pretraining on the templated corpus.")
    flags.DEFINE_integer("prompts", 2048, "Questions for SL-CAI and for RL-CAI labels.")
    flags.DEFINE_integer("heldout", 256, "Held-out questions for the checked metric (a multiple of 8).")
    flags.DEFINE_integer("ppo_steps", 100, "PPO iterations against the preference model (0: no PPO stage).")
    flags.DEFINE_multi_string("set", [], "Config overrides for every stage, as section.key=value.")
    from train import cli

    cli.run(main)
