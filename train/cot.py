"""Chain-of-thought prompting and self-consistency.

Papers:
  * Wei et al. 2022, "Chain-of-Thought Prompting Elicits Reasoning in Large Language Models":
    few-shot exemplars whose answers carry a rationale, in the format

        Q: {question}
        A: {rationale} The answer is {answer}.
        <blank line>
        ...
        Q: {test question}
        A:

    Standard prompting is the same without the rationale (``A: The answer is {answer}.``).
  * Wang et al. 2022, "Self-Consistency Improves Chain of Thought Reasoning in Language Models":
    sample k reasoning paths, extract each final answer, and take the majority vote.

Exemplar files are JSONL, one object per line, in either format:
  * loom's: ``{"question": str, "rationale": str, "answer": str | number}``;
  * GSM8K's: ``{"question": str, "answer": "<rationale lines>\\n#### N"}``. The calculator
    annotations ``<<48/2=24>>`` are removed and the rationale's lines are joined with spaces.
Blank lines are skipped; a malformed line raises ValueError naming the file and the 1-based line.

loom's compact arithmetic corpus (`train.data.Problem`, or anything with its fields: `CompactProblem`)
goes through the same builder: `as_exemplar` turns a Problem into an Exemplar and ``compact=True``
drops the spaces after ``Q:``/``A:`` and before ``The answer is``, so an exemplar renders as exactly
``problem.prompt + problem.cot`` (``problem.direct`` for standard prompting) and the query as exactly
``problem.prompt``.

Answers are compared as normalized number strings (`normalize_number`): ``$1,234.`` and
``1234.0`` both become ``1234``. `extract_strict` is the one answer extraction of the code base:
`train.data.extract_answer` (exact match on the corpus) reads its integer answers through it.
This module imports nothing from `train`, so the data package can use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Exemplar:
    """One few-shot exemplar: question text, rationale (may be empty) and final answer."""

    question: str
    rationale: str
    answer: str


@runtime_checkable
class CompactProblem(Protocol):
    """A problem of loom's compact arithmetic corpus (`train.data.Problem`): ``prompt`` 'Q:{question}\\nA:',
    ``cot`` the worked steps then ``direct``, ``direct`` 'The answer is {answer}.'."""

    prompt: str
    cot: str
    direct: str
    answer: int


# ----------------------------------------------------------------------------------------------
# Exemplar files

_ANNOTATION = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"^####[ \t]*(.+?)\s*$", re.MULTILINE)


def parse_gsm8k_answer(text: str) -> tuple[str, str]:
    """(rationale, answer) of a GSM8K answer field: rationale lines, then ``#### N``.

    Calculator annotations ``<<...>>`` are removed, lines are stripped and joined with single spaces.
    Raises ValueError when there is no ``#### N`` line.
    """
    match = _GSM8K_FINAL.search(text)
    if not match:
        raise ValueError("GSM8K answer has no final '#### N' line")
    body = _ANNOTATION.sub("", text[: match.start()])
    rationale = " ".join(line.strip() for line in body.splitlines() if line.strip())
    return rationale, normalize_number(match.group(1))


def _exemplar_from_json(obj: object) -> Exemplar:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("question"), str):
        raise ValueError("expected a string field 'question'")
    answer = obj.get("answer")
    if "rationale" in obj:  # loom's format
        if not isinstance(obj["rationale"], str):
            raise ValueError("field 'rationale' must be a string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise ValueError("expected a field 'answer' (string or number)")
        return Exemplar(obj["question"], obj["rationale"].strip(), normalize_number(str(answer)))
    if not isinstance(answer, str):
        raise ValueError("expected fields 'question', 'rationale', 'answer' (loom) or a string 'answer' (GSM8K)")
    rationale, final = parse_gsm8k_answer(answer)
    return Exemplar(obj["question"], rationale, final)


def _read_lines(path: str | os.PathLike) -> list[str]:
    """A UTF-8 file's lines; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exemplar file not found (or not a regular file): {path}")
    try:
        return path.read_bytes().decode("utf-8").splitlines()
    except OSError as e:
        raise OSError(f"cannot read exemplar file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte {e.start}") from None


def load_exemplars(path: str | os.PathLike) -> list[Exemplar]:
    """Exemplars from a JSONL file in loom's or GSM8K's format (see the module docstring)."""
    exemplars = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            exemplars.append(_exemplar_from_json(json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: malformed JSON ({e.msg} at column {e.colno}).") from None
        except ValueError as e:
            raise ValueError(f"{path}, line {lineno}: {e}.") from None
    if not exemplars:
        raise ValueError(f"{path}: no exemplars (the file has no non-blank lines).")
    return exemplars


# ----------------------------------------------------------------------------------------------
# Prompts


def as_exemplar(item: Exemplar | CompactProblem) -> Exemplar:
    """An Exemplar as is; a compact-corpus Problem as (its question, its worked steps, its answer).

    For ``Problem(prompt='Q:7+3\\nA:', cot='+3=10.The answer is 10.', ...)`` this gives
    ``Exemplar('7+3', '+3=10.', '10')``.
    """
    if isinstance(item, Exemplar):
        return item
    if isinstance(item, CompactProblem):
        question = item.prompt.removeprefix("Q:").removesuffix("\nA:")
        return Exemplar(question, item.cot.removesuffix(item.direct), str(item.answer))
    raise TypeError(f"expected an Exemplar or a train.data.Problem, got {type(item).__name__}")


def build_prompt(
    exemplars: Sequence[Exemplar | CompactProblem],
    question: str | Exemplar | CompactProblem,
    *,
    chain_of_thought: bool = True,
    compact: bool = False,
) -> str:
    """The few-shot prompt of Wei et al. 2022 ending in ``A:``, for the model to complete.

    Each exemplar is ``Q: {question}\\nA: {rationale} The answer is {answer}.\\n\\n`` (standard
    prompting, ``chain_of_thought=False``, drops the rationale), then ``Q: {question}\\nA:``.
    ``compact=True`` writes loom's arithmetic notation, without the spaces after ``Q:``/``A:`` and
    before ``The answer is``. Problems are accepted wherever Exemplars are (via `as_exemplar`);
    a question may be a string, an Exemplar or a Problem.
    """
    sp = "" if compact else " "
    parts = []
    for ex in map(as_exemplar, exemplars):
        rationale = ex.rationale + sp if chain_of_thought and ex.rationale else ""
        parts.append(f"Q:{sp}{ex.question}\nA:{sp}{rationale}The answer is {ex.answer}.\n\n")
    if not isinstance(question, str):
        question = as_exemplar(question).question
    parts.append(f"Q:{sp}{question}\nA:")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# Answers

# A minus sign counts only where it cannot be subtraction (not right after a digit, letter or ')'):
# before the '$' or, after a '$', right before the digits ('-$5', '$-5').
_NUMBER = r"(?:(?<![\w)])-\$?|\$-?)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)"
_STRICT = re.compile(r"The answer is\s*(" + _NUMBER + ")")
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(s: str) -> str:
    """Canonical form of a number string: no ``$``, commas, spaces, trailing ``.``, ``+`` sign,
    leading zeros or zero fraction digits (``'$1,234.'`` -> ``'1234'``, ``'-12.50'`` -> ``'-12.5'``,
    ``'-0.0'`` -> ``'0'``). A string that is not a number comes back with only those characters removed.
    """
    t = s.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    match = re.fullmatch(r"([-+]?)(\d*)(?:\.(\d*))?", t)
    if not match or not (match.group(2) or match.group(3)):
        return t
    sign, whole, frac = match.group(1), match.group(2).lstrip("0") or "0", (match.group(3) or "").rstrip("0")
    number = f"{whole}.{frac}" if frac else whole
    return "-" + number if sign == "-" and number != "0" else number


def extract_strict(text: str) -> str | None:
    """The number of the first ``The answer is N`` in text, normalized; None if there is none.

    N may carry ``$``, thousands commas, a minus sign, decimals and a trailing period.
    """
    match = _STRICT.search(text)
    return normalize_number(match.group(1)) if match else None


def extract_flexible(text: str) -> str | None:
    """The last number in text, normalized; None if there is none."""
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def answers_match(pred: str | None, gold: str | int | float) -> bool:
    """Whether a predicted answer equals the gold one after `normalize_number` (None never matches)."""
    return pred is not None and normalize_number(str(pred)) == normalize_number(str(gold))


# ----------------------------------------------------------------------------------------------
# Self-consistency (Wang et al. 2022)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent normalized answer, ignoring None; None when every answer is None.

    Ties go to the answer whose first occurrence comes earliest in `answers`.
    """
    counts: dict[str, int] = {}  # insertion order = order of first occurrence
    for a in answers:
        if a is not None:
            key = normalize_number(a)
            counts[key] = counts.get(key, 0) + 1
    return max(counts, key=counts.__getitem__) if counts else None  # max keeps the first of equals


GenerateFn = Callable[[list[str], int], list[list[str]]]


def self_consistency(
    generate_fn: GenerateFn,
    prompts: Sequence[str],
    golds: Sequence[str | int | float],
    *,
    k: int,
    extract: Callable[[str], str | None] = extract_strict,
) -> dict:
    """Samples k completions per prompt and scores the first sample and the majority vote.

    ``generate_fn(prompts, num_samples)`` returns ``num_samples`` completions per prompt (the text
    after the prompt). Returns ``{'maj@1', 'maj@k': accuracies, 'k': k, 'problems': [...]}`` where
    each problem is ``{'gold', 'answers' (extracted, None where none), 'vote', 'correct'}``;
    ``maj@1`` scores the first sample alone, ``maj@k`` the majority of all k.
    """
    if k < 1:
        raise ValueError(f"k={k} must be at least 1.")
    if len(prompts) != len(golds) or not prompts:
        raise ValueError(
            f"need as many golds as prompts, at least one: got {len(prompts)} prompts, {len(golds)} golds."
        )
    completions = generate_fn(list(prompts), k)
    if len(completions) != len(prompts) or any(len(c) != k for c in completions):
        raise ValueError(f"generate_fn must return {k} completions for each of the {len(prompts)} prompts.")
    problems, first_correct = [], 0
    for samples, gold in zip(completions, golds):
        answers = [extract(s) for s in samples]
        vote = majority_vote(answers)
        first_correct += answers_match(answers[0], gold)
        problems.append({"gold": normalize_number(str(gold)), "answers": answers, "vote": vote,
                         "correct": answers_match(vote, gold)})
    n = len(problems)
    return {"maj@1": first_correct / n, "maj@k": sum(p["correct"] for p in problems) / n, "k": k,
            "problems": problems}


def evaluate_cot(
    generate_fn: GenerateFn,
    problems: Sequence[Exemplar | CompactProblem],
    exemplars: Sequence[Exemplar | CompactProblem] = (),
    *,
    compact: bool = False,
    extract: Callable[[str], str | None] = extract_strict,
) -> dict[str, float]:
    """Accuracy of one sample per problem under standard and chain-of-thought prompting, same exemplars.

    Returns ``{'standard': accuracy, 'cot': accuracy}``; gold answers are the problems' answers.
    """
    items = [as_exemplar(p) for p in problems]
    golds = [p.answer for p in items]
    results = {}
    for name, cot in (("standard", False), ("cot", True)):
        prompts = [build_prompt(exemplars, p.question, chain_of_thought=cot, compact=compact) for p in items]
        results[name] = self_consistency(generate_fn, prompts, golds, k=1, extract=extract)["maj@1"]
    return results
