"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback"): the constitution,
the supervised stage's critique-revision data (SL-CAI, sec. 3) and the RL stage's AI-feedback labels
(RL-CAI, sec. 4). The preference model's loss is ``train.orpo.preference_model_objective`` (soft-label
Bradley-Terry); policy optimization against it is ``train.ppo`` (PPO) or, as the open recipes do, ORPO /
DPO (``train.orpo``) on the AI-labeled pairs. Every stage reads and writes JSONL, so stages rerun and resume.

Constitution file (JSON, or YAML by extension ``.yaml`` / ``.yml``):
    {"principles": [{"name": str, "critique": str, "revision": str, "feedback": str}, ...],
     "examples":   [{"prompt": str, "response": str, "critique_request": str, "critique": str,
                     "revision_request": str, "revision": str}, ...]}      (few-shot, may be empty)
``critique`` / ``revision`` are a principle's critique request and revision request (sec. 3.1);
``feedback`` is its comparison question for RL-CAI (sec. 4.1, e.g. "Which response is correct?"),
needed only by `feedback_labels`. A missing or non-string field is refused naming the record.

SL-CAI (`critique_revise`): for each prompt, an initial response, then ``rounds`` times: a principle
drawn at random (a stable hash of seed, prompt index and round), a critique of the current response under
its critique request, a revision under its revision request; the revision is the next round's response.
Output records keep every field: human (the prompt as given), prompt (the conversation the responses
continue, "Human: ...\n\nAssistant: "), initial, rounds [{principle, critique_request, critique,
revision_request, revision}], and completion (the final revision: the SFT target, so the file is a
``data.source='jsonl'`` training file as it is). `revision_pairs` makes (prompt, chosen = final revision,
rejected = initial) pairs labeled ``"origin": "revision_vs_initial"``: an extension of the paper (the
open recipes build them), not part of its method.

RL-CAI (`feedback_labels`): for each prompt, two sampled responses A and B; the feedback model reads
the conversation, a randomly drawn principle's question and the options "(A)" / "(B)"; the probabilities of
the option tokens after "The answer is: (" are normalized, p_A = P(A) / (P(A) + P(B)), averaged over
``principles_per_pair`` principles (the paper ensembles 16), and the pair (chosen A, rejected B,
label p_A) is written for the preference model. Chain-of-thought feedback (sec. 4.1) first samples the
feedback model's reasoning after "Let's think step by step:", then scores the options; as in the paper
its probabilities are clamped to [0.4, 0.6] (``cot_clamp``), since CoT labels are overconfident.

Generation goes through a `Generator`: `ModelGenerator` wraps ``models.generate.complete`` and one forward
pass for the option probabilities; tests use a scripted one, so the data flow is checked exactly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Protocol, Sequence

import numpy as np
from absl import logging

from train.data.records import stable_hash
from train.data.text import jsonl_objects, read_text

PRINCIPLE_FIELDS = ("name", "critique", "revision")
EXAMPLE_FIELDS = ("prompt", "response", "critique_request", "critique", "revision_request", "revision")
OPTIONS = ("A", "B")
COT_CLAMP = (0.4, 0.6)


# ----------------------------------------------------------------------------- the constitution

@dataclasses.dataclass(frozen=True)
class Principle:
    name: str
    critique: str       # critique request
    revision: str       # revision request
    feedback: str = ""  # comparison question for AI feedback


@dataclasses.dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    examples: tuple[dict, ...] = ()


def parse_constitution(obj, where: str = "constitution") -> Constitution:
    """A Constitution from the decoded file; ValueError naming the record for anything missing."""
    if not isinstance(obj, dict) or not isinstance(obj.get("principles"), list) or not obj["principles"]:
        raise ValueError(f"{where}: expected an object with a non-empty list 'principles'.")
    principles = []
    for i, p in enumerate(obj["principles"]):
        name = p.get("name") if isinstance(p, dict) else None
        record = f"{where}: principles[{i}]" + (f" ({name!r})" if isinstance(name, str) else "")
        if not isinstance(p, dict):
            raise ValueError(f"{record} is not an object.")
        for field in PRINCIPLE_FIELDS + (("feedback",) if "feedback" in p else ()):
            if not isinstance(p.get(field), str) or not p[field].strip():
                raise ValueError(f"{record} is missing field {field!r} (a non-empty string).")
        principles.append(Principle(p["name"], p["critique"], p["revision"], p.get("feedback", "")))
    names = [p.name for p in principles]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: principle names repeat; give each principle its own name.")
    examples = obj.get("examples", [])
    if not isinstance(examples, list):
        raise ValueError(f"{where}: 'examples' must be a list.")
    for i, e in enumerate(examples):
        for field in EXAMPLE_FIELDS:
            if not isinstance(e, dict) or not isinstance(e.get(field), str):
                raise ValueError(f"{where}: examples[{i}] is missing field {field!r} (a string).")
    return Constitution(tuple(principles), tuple(dict(e) for e in examples))


def load_constitution(path: str | os.PathLike) -> Constitution:
    """The constitution file at ``path`` (JSON, or YAML for .yaml / .yml)."""
    text = read_text(path)
    try:
        if str(path).endswith((".yaml", ".yml")):
            import yaml
            obj = yaml.safe_load(text)
        else:
            obj = json.loads(text)
    except Exception as e:  # noqa: BLE001  (JSON and YAML raise their own error types)
        raise ValueError(f"{path}: not a valid constitution file ({e}).") from None
    return parse_constitution(obj, str(path))


def draw_principle(constitution: Constitution, seed: int, stage: str, index: int, round_: int) -> Principle:
    """The principle of (stage, prompt index, round): uniform, from a stable hash, so a rerun draws the same."""
    rng = random.Random(stable_hash(f"cai/{stage}/{seed}/{index}/{round_}"))
    return constitution.principles[rng.randrange(len(constitution.principles))]


# ----------------------------------------------------------------------------- templates

def conversation(prompt: str, response: str) -> str:
    return f"Human: {prompt}\n\nAssistant: {response}"


def critique_prompt(prompt: str, response: str, request: str) -> str:
    """The text after which the model writes a critique."""
    return f"{conversation(prompt, response)}\n\nCritiqueRequest: {request}\n\nCritique:"


def revision_prompt(prompt: str, response: str, critique_request: str, critique: str, request: str) -> str:
    """The text after which the model writes a revision."""
    return (f"{critique_prompt(prompt, response, critique_request)} {critique}\n\nRevisionRequest: {request}"
            f"\n\nRevision:")


def few_shot(constitution: Constitution) -> str:
    """The constitution's examples, each a whole critique-revision exchange, separated by blank lines."""
    return "".join(revision_prompt(e["prompt"], e["response"], e["critique_request"], e["critique"],
                                   e["revision_request"]) + f" {e['revision']}\n\n" for e in constitution.examples)


def feedback_prompt(prompt: str, question: str, a: str, b: str) -> str:
    """Sec. 4.1's multiple-choice feedback format, ending where the option letter is scored (cot: reasoning
    is inserted before 'The answer is: (')."""
    return (f"Consider the following conversation between a human and an assistant:\nHuman: {prompt}\n"
            f"{question}\nOptions:\n(A) {a}\n(B) {b}\n")


ANSWER = "The answer is: ("
COT = "Let's think step by step:"


# ----------------------------------------------------------------------------- generators

class Generator(Protocol):
    def generate(self, prompts: Sequence[str], *, sample: bool, seed: int) -> list[str]:
        """A completion of each prompt (greedy, or sampled with ``seed``)."""

    def option_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> np.ndarray:
        """[len(prompts), len(options)]: log p(option's first token | prompt)."""


class ModelGenerator:
    """A model as a Generator: ``models.generate.complete`` for text (stops at eos; the text is cut at the first
    of ``stop_strings``, by default the templates' blank line), one forward pass for option log-probs.
    ``max_new_tokens``, ``temperature`` as in ``complete``."""

    def __init__(self, model, mcfg, params, tokenizer, *, max_new_tokens: int = 64, temperature: float = 1.0,
                 batch_size: int = 64, stop_strings: Sequence[str] = ("\n\n",)):
        self.model, self.mcfg, self.params, self.tokenizer = model, mcfg, params, tokenizer
        self.stop_strings = tuple(stop_strings)
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self._logits = None

    def generate(self, prompts, *, sample, seed):
        import jax

        from models import generate as gen
        out = []
        for i in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[i:i + self.batch_size])
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), i) if sample else None
            out += gen.complete(self.model, self.params, self.mcfg, self.tokenizer, chunk,
                                max_new_tokens=self.max_new_tokens, rng=rng, stop_strings=self.stop_strings,
                                **({"temperature": self.temperature} if sample else {}))
        return out

    def option_logprobs(self, prompts, options):
        import jax
        import jax.numpy as jnp

        from models.generate import bucket
        tok = self.tokenizer
        ids = [tok.encode(o)[0] for o in options]
        rows = [[tok.bos_id] + list(tok.encode(p)) for p in prompts]
        length = bucket(max(map(len, rows)))
        if self._logits is None:
            def last_logp(params, tokens, last):
                logits, _ = self.model.apply(params, tokens, self.mcfg)
                logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)
                return jax.nn.log_softmax(logits, axis=-1)
            self._logits = jax.jit(last_logp)
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            n = len(chunk)
            chunk = chunk + [chunk[0]] * (self.batch_size - n)
            tokens = np.full((len(chunk), length), tok.pad_id, np.int32)
            for r, row in enumerate(chunk):  # right padding: causal, so the last real token sees only the text
                tokens[r, :len(row)] = row
            last = np.array([len(row) - 1 for row in chunk], np.int32)
            out.append(np.asarray(self._logits(self.params, tokens, last))[:n][:, ids])
        return np.concatenate(out)


# ----------------------------------------------------------------------------- SL-CAI

def critique_revise(prompts: Sequence[str], constitution: Constitution, generator: Generator, *, rounds: int = 1,
                    seed: int = 0, use_few_shot: bool = True, sample_initial: bool = False) -> list[dict]:
    """SL-CAI records for ``prompts`` (see the module docstring), batched over prompts; the initial response is
    sampled with ``sample_initial`` (seed ``seed``), every other output greedy."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}; use at least one critique-revision round.")
    shots = few_shot(constitution) if use_few_shot else ""
    initial = generator.generate([conversation(p, "") for p in prompts], sample=sample_initial, seed=seed)
    current = list(initial)
    records = [{"human": p, "prompt": conversation(p, ""), "initial": r, "rounds": []}
               for p, r in zip(prompts, initial)]
    for k in range(rounds):
        drawn = [draw_principle(constitution, seed, "sl", i, k) for i in range(len(prompts))]
        critiques = generator.generate([shots + critique_prompt(p, r, d.critique)
                                        for p, r, d in zip(prompts, current, drawn)], sample=False, seed=seed)
        critiques = [c.strip() for c in critiques]
        revisions = generator.generate([shots + revision_prompt(p, r, d.critique, c, d.revision)
                                        for p, r, d, c in zip(prompts, current, drawn, critiques)],
                                       sample=False, seed=seed)
        revisions = [r.strip() for r in revisions]
        for rec, d, c, r in zip(records, drawn, critiques, revisions):
            rec["rounds"].append({"principle": d.name, "critique_request": d.critique, "critique": c,
                                  "revision_request": d.revision, "revision": r})
        current = revisions
    for rec, r in zip(records, current):
        rec["completion"] = r
    return records


def revision_pairs(records: Sequence[dict]) -> list[dict]:
    """(prompt, chosen = final revision, rejected = initial response) pairs, label 1, marked as the
    extension they are; records whose two responses are equal (nothing revised) or empty are left out, the
    count logged."""
    pairs = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["initial"], "label": 1.0,
              "origin": "revision_vs_initial"} for r in records if r["completion"].strip() != r["initial"].strip()
             and r["completion"].strip() and r["initial"].strip()]
    if len(pairs) < len(records):
        logging.warning("revision pairs: %d of %d SL-CAI records left out (revision equal to the initial response, "
                        "or an empty response).", len(records) - len(pairs), len(records))
    return pairs


# ----------------------------------------------------------------------------- RL-CAI

def normalize_options(logprobs: np.ndarray) -> np.ndarray:
    """[n, 2] option log-probs -> P(A) / (P(A) + P(B)) per row, float64 (a softmax over the two options)."""
    lp = np.asarray(logprobs, np.float64)
    return 1.0 / (1.0 + np.exp(lp[:, 1] - lp[:, 0]))


def feedback_labels(prompts: Sequence[str], constitution: Constitution, policy: Generator, feedback: Generator, *,
                    seed: int = 0, principles_per_pair: int = 1, cot: bool = False,
                    cot_clamp: tuple[float, float] = COT_CLAMP, resample: int = 3) -> list[dict]:
    """RL-CAI preference records for ``prompts``: two sampled responses each, labeled by ``feedback`` (see the
    module docstring). Record: prompt, chosen (A), rejected (B), label (p_A), principles, p_a (per principle),
    and with ``cot`` the reasonings. Where B equals A (a peaked policy samples the same response twice), B is
    sampled again, up to ``resample`` more times (seeds seed + 100 + t); pairs still equal are left out by
    ``labeled_pairs``."""
    if not all(p.feedback for p in constitution.principles):
        missing = next(p.name for p in constitution.principles if not p.feedback)
        raise ValueError(f"principle {missing!r} has no 'feedback' question; RL-CAI labels need one per principle.")
    conv = [conversation(p, "") for p in prompts]
    a = [r.strip() for r in policy.generate(conv, sample=True, seed=seed)]
    b = [r.strip() for r in policy.generate(conv, sample=True, seed=seed + 1)]
    for t in range(resample):
        same = [i for i in range(len(prompts)) if a[i] == b[i]]
        if not same:
            break
        for i, r in zip(same, policy.generate([conv[i] for i in same], sample=True, seed=seed + 100 + t)):
            b[i] = r.strip()
    per = np.zeros((len(prompts), principles_per_pair))
    names, reasons = [[] for _ in prompts], [[] for _ in prompts]
    for k in range(principles_per_pair):
        drawn = [draw_principle(constitution, seed, "rl", i, k) for i in range(len(prompts))]
        texts = [feedback_prompt(p, d.feedback, x, y) for p, d, x, y in zip(prompts, drawn, a, b)]
        if cot:
            thoughts = feedback.generate([t + COT for t in texts], sample=True, seed=seed + 2 + k)
            texts = [t + COT + " " + th.strip() + "\n" + ANSWER for t, th in zip(texts, thoughts)]
            for i, th in enumerate(thoughts):
                reasons[i].append(th.strip())
        else:
            texts = [t + ANSWER for t in texts]
        p_a = normalize_options(feedback.option_logprobs(texts, OPTIONS))
        if cot:
            p_a = np.clip(p_a, *cot_clamp)
        per[:, k] = p_a
        for i, d in enumerate(drawn):
            names[i].append(d.name)
    out = []
    for i, p in enumerate(prompts):
        rec = {"prompt": conversation(p, ""), "chosen": a[i], "rejected": b[i], "label": float(per[i].mean()),
               "principles": names[i], "p_a": per[i].tolist()}
        if cot:
            rec["reasoning"] = reasons[i]
        out.append(rec)
    return out


def labeled_pairs(records: Sequence[dict]) -> list[dict]:
    """The feedback records that make preference pairs (non-empty, different responses); the others are left
    out, the count logged."""
    pairs = [r for r in records if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]]
    if len(pairs) < len(records):
        logging.warning("AI-feedback pairs: %d of %d left out (an empty response, or two equal samples).",
                        len(records) - len(pairs), len(records))
    return pairs


# ----------------------------------------------------------------------------- files

def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every JSON object of a JSONL file (blank lines skipped); errors name the file and line."""
    return [obj for obj, _ in jsonl_objects([path])]


def write_jsonl(path: str | os.PathLike, records: Sequence[dict]) -> int:
    """Writes ``records`` one per line (through a temporary file, renamed: a rerun never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)
    return len(records)


def prompt_text(record: dict) -> str:
    """A prompt file's record: {"prompt": str}."""
    if not isinstance(record.get("prompt"), str) or not record["prompt"]:
        raise ValueError(f"prompt record {record!r} has no non-empty string 'prompt'.")
    return record["prompt"]


# ----------------------------------------------------------------------------- stages

def load_params(config, workdir: str):
    """The latest checkpoint's parameters of the run of ``config`` in ``workdir`` (``train.evaluate.load_state``)."""
    from train.evaluate import load_state

    return load_state(config, workdir)[1].params


# ----------------------------------------------------------------------------- a constitution a program can check

# The arithmetic experiment (experiments/cai_run.py): two principles over the embedded arithmetic corpus's
# chains of thought, each checked by `check_response`: every step's arithmetic is right ("correct"), and
# the response ends with "The answer is N." ("format"). A small model cannot follow free-form requests it has
# never seen, so `format_corpus` writes templated examples of each format (responses, critiques, revisions,
# comparisons) for the base model to learn.

STEP = r"([+\-*/%])(\d+)=(\d+)"


def human_text(problem) -> str:
    """The question of an arithmetic problem without the corpus's 'Q:' and '\\nA:' ('7+3*2')."""
    return problem.prompt.removeprefix("Q:").removesuffix("\nA:")


def check_response(problem, response: str) -> dict[str, bool]:
    """The program's verdict on a response to ``problem``: 'correct' (the steps are the problem's steps,
    each result right, and the last number stated is the answer) and 'format' (it ends with 'The answer is N.'
    for an integer N)."""
    import re

    from train.data.arithmetic import apply_op

    steps = re.findall(STEP, response)
    question = re.findall(r"([+\-*/%])(\d+)", human_text(problem))
    value, ok = int(re.match(r"\d+", human_text(problem)).group()), len(steps) == len(question)
    for (op, n, v), (qop, qn) in zip(steps, question):
        value = apply_op(value, qop, int(qn))
        ok = ok and (op, n) == (qop, qn) and int(v) == value
    numbers = re.findall(r"\d+", response)
    ok = ok and bool(numbers) and int(numbers[-1]) == problem.answer
    return {"correct": ok, "format": re.search(r"The answer is \d+\.$", response.strip()) is not None}


def flawed_responses(problem, seed: int) -> dict[str, str]:
    """A problem's responses: 'good' (its chain of thought), 'wrong' (the last step and answer wrong, as the
    rejected side of ``arithmetic_pairs``), 'unformatted' (right, but ending 'Answer: N.') and 'both'."""
    from train.data.arithmetic import preference_pair

    wrong = preference_pair(problem, seed)[2]
    unformat = lambda r: r[: r.rindex("The answer is")] + "Answer: " + r[r.rindex("is ") + 3:]  # noqa: E731
    return {"good": problem.cot, "wrong": wrong, "unformatted": unformat(problem.cot), "both": unformat(wrong)}


def critique_text(principle: str, verdict: dict[str, bool]) -> str:
    """The templated critique the corpus teaches for a principle ('correct' or 'format') and a verdict."""
    if principle == "correct":
        return "The arithmetic is right." if verdict["correct"] else "A step or the answer is wrong."
    return "The format is right." if verdict["format"] else "It does not end with 'The answer is N.'"


def format_corpus(constitution: Constitution, seed: int, indices: Sequence[int],
                  mix: dict[str, float] | None = None) -> list[dict]:
    """Templated (prompt, completion) examples over training problems ``indices`` (held-out questions skipped)
    in all the formats CAI uses: per problem, a response (drawn from ``mix``: good / wrong / unformatted / both),
    a critique of it under a drawn principle, a revision (always the good response), and a comparison of two of
    its responses under a drawn principle's feedback question, answered with the letter the program prefers
    (a tie under that principle is left out). Principles must be named 'correct' and 'format'."""
    from train.data.arithmetic import training_problem

    names = {p.name for p in constitution.principles}
    if names != {"correct", "format"}:
        raise ValueError(f"the arithmetic corpus needs principles named 'correct' and 'format', not {sorted(names)}.")
    mix = mix or {"good": 0.5, "wrong": 0.2, "unformatted": 0.2, "both": 0.1}
    kinds, weights = list(mix), np.asarray(list(mix.values()), float)
    out = []
    for index in indices:
        problem = training_problem(seed, index)
        if problem is None:
            continue
        rng = random.Random(stable_hash(f"cai-corpus/{seed}/{index}"))
        responses = flawed_responses(problem, seed)
        kind = rng.choices(kinds, weights)[0]
        q, response = human_text(problem), responses[kind]
        out.append({"prompt": conversation(q, ""), "completion": response})
        p = constitution.principles[rng.randrange(len(constitution.principles))]
        verdict = check_response(problem, response)
        out.append({"prompt": critique_prompt(q, response, p.critique),
                    "completion": " " + critique_text(p.name, verdict)})
        out.append({"prompt": revision_prompt(q, response, p.critique, critique_text(p.name, verdict), p.revision),
                    "completion": " " + responses["good"]})
        a, b = rng.sample(list(responses.values()), 2)
        p = constitution.principles[rng.randrange(len(constitution.principles))]
        va, vb = check_response(problem, a)[p.name], check_response(problem, b)[p.name]
        if va != vb:
            out.append({"prompt": feedback_prompt(q, p.feedback, a, b) + ANSWER, "completion": "A)" if va else "B)"})
    return out
