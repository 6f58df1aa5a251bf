"""The embedded arithmetic corpus: problems generated from a seed, held-out questions, mixture
contexts, few-shot exemplars and preference pairs.

A problem is a start value in 0..99 and 1..8 operations applied left to right (no precedence):
  +n, -n      n in 1..9, only while the value stays in 0..99
  *n          n in 2..5, only while the value stays <= 99 (and the value is >= 1)
  /2          integer halving (floor)
  %n          remainder, n in 3..9
Every symbol is one byte. Example:
  prompt  'Q:7+3*2/2%5\\nA:'
  cot     '+3=10*2=20/2=10%5=0.The answer is 0.'
  direct  'The answer is 0.'
A stable hash of the question holds out ~10% of all questions (`is_heldout`); training streams skip
them and evaluation reads only them.
"""
from __future__ import annotations

import dataclasses
import random
import re

import numpy as np

from train import cot
from train.data.records import PairRecord, stable_hash

VARIANTS = ("cot", "direct")  # completions of one problem
MAX_STEPS = 8
MAX_VALUE = 99
MAX_OPERAND = 9  # + and - use one-digit operands: a small model learns the facts in budget
HELDOUT_PER_MILLE = 100
CONTEXT_STRIDE = 16  # problem indices reserved per mixture context (held-out ones are skipped)
WRONG_OFFSETS = (-3, -2, -1, 1, 2, 3)  # a rejected answer's distance from the correct one


@dataclasses.dataclass(frozen=True)
class Problem:
    prompt: str
    cot: str
    direct: str
    answer: int
    num_steps: int

    def completion(self, variant: str) -> str:
        """The completion for 'cot' or 'direct'."""
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is unknown; use one of {', '.join(map(repr, VARIANTS))}.")
        return self.cot if variant == "cot" else self.direct


def apply_op(value: int, op: str, n: int) -> int:
    """One operation: '+', '-', '*', '/' (floor division) or '%'."""
    if op == "+":
        return value + n
    if op == "-":
        return value - n
    if op == "*":
        return value * n
    if op == "/":
        return value // n
    if op == "%":
        return value % n
    raise ValueError(f"unknown operation {op!r}")


def _random_op(rng: random.Random, value: int) -> tuple[str, int]:
    """A uniformly chosen operation that keeps the value in 0..MAX_VALUE, with its operand."""
    ops = ["/", "%"]
    if value < MAX_VALUE:
        ops.append("+")
    if value >= 1:
        ops.append("-")
    if 1 <= value and 2 * value <= MAX_VALUE:
        ops.append("*")
    op = ops[rng.randrange(len(ops))]
    if op == "+":
        return op, rng.randint(1, min(MAX_OPERAND, MAX_VALUE - value))
    if op == "-":
        return op, rng.randint(1, min(MAX_OPERAND, value))
    if op == "*":
        return op, rng.randint(2, min(5, MAX_VALUE // value))
    if op == "/":
        return op, 2
    return op, rng.randint(3, 9)


def arithmetic_problem(seed: int, index: int, num_steps: int) -> Problem:
    """The problem with this index, a pure function of (seed, index, num_steps)."""
    if not 1 <= num_steps <= MAX_STEPS:
        raise ValueError(f"num_steps={num_steps} is outside 1..{MAX_STEPS}.")
    rng = random.Random(stable_hash(f"arith/{seed}/{index}/{num_steps}"))
    value = rng.randrange(100)
    question, work = [str(value)], []
    for _ in range(num_steps):
        op, n = _random_op(rng, value)
        value = apply_op(value, op, n)
        question.append(f"{op}{n}")
        work.append(f"{op}{n}={value}")
    direct = f"The answer is {value}."
    return Problem(
        prompt=f"Q:{''.join(question)}\nA:",
        cot="".join(work) + "." + direct,
        direct=direct,
        answer=value,
        num_steps=num_steps,
    )


def is_heldout(prompt: str) -> bool:
    """Whether a question belongs to the held-out set (~10%, decided by a stable hash of its text)."""
    return stable_hash(prompt) % 1000 < HELDOUT_PER_MILLE


def problem_steps(seed: int, index: int, min_steps: int, max_steps: int) -> int:
    """The number of operations of problem `index` in a stream mixing min_steps..max_steps."""
    return min_steps + stable_hash(f"steps/{seed}/{index}") % (max_steps - min_steps + 1)


def training_problem(seed: int, index: int, min_steps: int = 1, max_steps: int = MAX_STEPS) -> Problem | None:
    """Problem `index` of the training stream, or None where that question is held out (skipped)."""
    problem = arithmetic_problem(seed, index, problem_steps(seed, index, min_steps, max_steps))
    return None if is_heldout(problem.prompt) else problem


def heldout_problems(num_steps: int, n: int, seed: int = 0, at_most: bool = False) -> list[Problem]:
    """The first `n` distinct held-out problems with `num_steps` operations, in generation order.

    Few operations allow few distinct questions (1 operation: 273 held out); where fewer than `n`
    exist this raises ValueError, or with `at_most` returns all there are."""
    found: dict[str, Problem] = {}
    limit = 200 * n + 10_000
    for index in range(limit):
        if len(found) == n:
            break
        problem = arithmetic_problem(seed, index, num_steps)
        if is_heldout(problem.prompt):
            found.setdefault(problem.prompt, problem)
    if len(found) < n and not at_most:
        raise ValueError(
            f"found only {len(found)} distinct held-out problems with num_steps={num_steps}; ask for fewer."
        )
    return list(found.values())


def eval_problems(seed: int, n: int, min_steps: int, max_steps: int) -> list[Problem]:
    """The evaluation split: `n` held-out problems shared as evenly as possible among min_steps..max_steps
    operations (fewer operations first), each group in `heldout_problems` order."""
    counts = np.diff(np.linspace(0, n, max_steps - min_steps + 2).astype(int))
    return [p for steps, k in zip(range(min_steps, max_steps + 1), counts)
            for p in heldout_problems(steps, int(k), seed)]


def mixture_context(seed: int, index: int, min_steps: int = 1, max_steps: int = MAX_STEPS,
                    context_problems: int = 4, cot_fraction: float = 0.5) -> str:
    """Context `index` of the 'mixture' stream: 1..context_problems training problems in one style.

    The style (chain-of-thought with probability `cot_fraction`, else direct) and the count are
    drawn per context from a stable hash; problems come from indices index * CONTEXT_STRIDE + j,
    skipping held-out questions. The text is what `train.cot.build_prompt(compact=True)` writes
    for the exemplars, without the final blank line:
        'Q:7+3\\nA:+3=10.The answer is 10.\\n\\nQ:5*2\\nA:*2=10.The answer is 10.'
    """
    rng = random.Random(stable_hash(f"context/{seed}/{index}"))
    count = rng.randint(1, context_problems)
    variant = "cot" if rng.random() < cot_fraction else "direct"
    problems = (training_problem(seed, index * CONTEXT_STRIDE + j, min_steps, max_steps) for j in range(CONTEXT_STRIDE))
    chosen = [p for p in problems if p is not None][:count]
    return "\n\n".join(p.prompt + p.completion(variant) for p in chosen)


def exemplar_problems(shots: int, seed: int, min_steps: int = 1, max_steps: int = MAX_STEPS) -> list[Problem]:
    """Few-shot exemplars for held-out evaluation: `shots` training (never held-out) problems with
    min_steps + 1, min_steps + 2, ... operations (at most max_steps), so that a prompt stays as
    short as the training contexts; taken from indices past the training stream's reach."""
    out, index = [], 1 << 40
    while len(out) < shots:
        steps = min(min_steps + 1 + len(out), max_steps)
        problem = arithmetic_problem(seed, index, steps)
        index += 1
        if not is_heldout(problem.prompt):
            out.append(problem)
    return out


def extract_answer(text: str) -> int | None:
    """The integer N of the first 'The answer is N' in text (`train.cot.extract_strict`), or None
    (also when N is not an integer)."""
    answer = cot.extract_strict(text)
    return int(answer) if answer is not None and re.fullmatch(r"-?\d+", answer) else None


# ----------------------------------------------------------------------------------------------
# Preference pairs


def wrong_answer(problem: Problem, seed: int) -> int:
    """A wrong final answer for `problem`: the correct one plus an offset drawn uniformly from
    WRONG_OFFSETS (+-1, +-2, +-3) by a stable hash of (seed, question), negated when that leaves 0..99:
    a plausible value in the corpus's range, so a pair differs only in its last step's arithmetic."""
    offset = WRONG_OFFSETS[stable_hash(f"wrong/{seed}/{problem.prompt}") % len(WRONG_OFFSETS)]
    wrong = problem.answer + offset
    return wrong if 0 <= wrong <= MAX_VALUE else problem.answer - offset


def preference_pair(problem: Problem, seed: int, variant: str = "cot") -> PairRecord:
    """(prompt, chosen, rejected): chosen is the correct completion; rejected is the same completion
    with the wrong answer W = `wrong_answer(problem, seed)` as its last step's result and final answer:
        chosen    '+3=10*2=20/2=10%5=0.The answer is 0.'
        rejected  '+3=10*2=20/2=10%5=2.The answer is 2.'   (direct: 'The answer is 2.')
    """
    wrong = wrong_answer(problem, seed)
    chosen = problem.completion(variant)
    tail = f"{problem.answer}.{problem.direct}" if variant == "cot" else problem.direct
    rejected = chosen.removesuffix(tail) + (f"{wrong}." if variant == "cot" else "") + f"The answer is {wrong}."
    return problem.prompt, chosen, rejected


def training_pair(seed: int, index: int, min_steps: int = 1, max_steps: int = MAX_STEPS,
                  variant: str = "cot") -> PairRecord | None:
    """The preference pair of training problem `index` (`training_problem`), None where it is held out."""
    problem = training_problem(seed, index, min_steps, max_steps)
    return None if problem is None else preference_pair(problem, seed, variant)
