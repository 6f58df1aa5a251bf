"""Training and evaluation data: tokenizers, corpora that need no download, and the Grain pipeline.

Sources (``data_cfg.source``):
  * ``'arithmetic'``: the embedded arithmetic corpus, generated from a seed (see `arithmetic_problem`).
    ``data_cfg.variant`` picks the completions: ``'cot'`` (every step), ``'direct'`` (the answer
    only), or ``'mixture'``: multi-example contexts of 1..``context_problems`` problems, each
    context all chain-of-thought (a ``cot_fraction`` of them) or all direct, in the few-shot
    prompt format of `train.cot.build_prompt` (see `mixture_context`); every token is trained on.
  * ``'text'``: UTF-8 text files. Each file is split on blank lines into documents; a document
    longer than the context is cut at line ends into chunks of at most ``seq_len - 1`` characters
    (``data_cfg.chunk_chars`` overrides). Every token is trained on.
  * ``'jsonl'``: one JSON object per line with a string field ``text`` (trained on every token) or
    string fields ``prompt`` and ``completion`` (trained on the completion). One line is one
    example; an example longer than the context is truncated.
  * ``'stdlib'``: the Python standard library's ``.py`` files on this machine, each file one
    document chunked like ``'text'``; a stable hash of the relative path puts ~5% in ``'eval'``.
  * ``'selective_copying'`` and ``'induction_heads'``: the synthetic tasks of the Mamba paper
    (Gu & Dao 2023, section 4.1 and appendix E.1), generated from a seed (see `synthetic_record`).
    A prompt of ``data_cfg.task_length`` symbols, each one byte; the completion is the answer.
    Selective copying: ``num_memorize`` data symbols (drawn from ``task_vocab`` symbols) at random
    positions among noise ``'.'``, then the marker ``'='``; the completion is the data symbols
    in order. Induction heads: ``task_length - 1`` random symbols in which the trigger ``'#'``
    appears once, followed by a key symbol, then ``'#'`` again; the completion is the key.
    Training examples are indices 0..``num_problems - 1`` of the ``'train'`` stream; the eval
    split is the first ``eval_examples`` of a separate ``'eval'`` stream (`synthetic_heldout`),
    which ``train.evaluate --task length_generalization`` also reads at each of ``eval_lengths``.
    These sources need the byte tokenizer (one token per symbol) and ``seq_len`` >= the example
    (`synthetic_example_tokens`).

Every example becomes ``e = [bos] + prompt_ids + completion_ids + [eos]`` (cut to ``seq_len + 1``
tokens), with ``inputs = e[:-1]`` and ``targets = e[1:]``. Examples are packed several to a row
(first fit, never split across rows) or, without packing, one to a row. A batch is a dict of
int32 arrays, all shaped ``[batch_size // process_count, seq_len]``:

  inputs       token ids fed to the model (``pad_id`` on padding)
  targets      the next token of the same example (``pad_id`` on padding)
  segment_ids  1, 2, 3, ... for the examples of a row; 0 on padding
  positions    0, 1, 2, ... restarting at every example; 0 on padding
  loss_mask    1 where the target is trained on, 0 on prompt tokens and padding

The training stream repeats forever and reshuffles each epoch; the eval stream is finite, in a
fixed order, and its last batch is filled up with padding rows so that every batch has one shape.
Iterators support ``get_state()`` / ``set_state()`` for exact resumption.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import sysconfig
import weakref
from pathlib import Path
from typing import Sequence

import grain
import ml_collections
import numpy as np

SYNTHETIC_SOURCES = ("selective_copying", "induction_heads")
SOURCES = ("arithmetic", "text", "jsonl", "stdlib") + SYNTHETIC_SOURCES
VARIANTS = ("cot", "direct")  # completions of one problem
DATA_VARIANTS = VARIANTS + ("mixture",)
TOKENIZERS = ("byte", "sentencepiece")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
MAX_STEPS = 8
MAX_VALUE = 99
MAX_OPERAND = 9  # + and - use one-digit operands: a small model learns the facts in budget

# A record is one example before tokenization: (prompt, completion). Plain text has an empty prompt.
Record = tuple[str, str]


def default_config() -> ml_collections.ConfigDict:
    """The data section of an experiment config."""
    return ml_collections.ConfigDict(
        dict(
            source="arithmetic",  # 'arithmetic' | 'text' | 'jsonl' | 'stdlib' | 'selective_copying' | 'induction_heads'
            variant="cot",  # arithmetic completions: 'cot' (every step), 'direct' or 'mixture' (contexts of both)
            context_problems=4,  # 'mixture': at most this many problems per context
            cot_fraction=0.5,  # 'mixture': the share of contexts in chain-of-thought style
            min_steps=1,  # arithmetic: number of operations per problem, in 1..8
            max_steps=8,
            paths=[],  # 'text' / 'jsonl': training files
            eval_paths=[],  # 'text' / 'jsonl': evaluation files
            tokenizer="byte",  # 'byte' | 'sentencepiece'
            spm_model="",  # SentencePiece model file when tokenizer='sentencepiece'
            packing=True,  # several examples per row (otherwise one, padded)
            pack_bins=0,  # rows packed at once; 0 means 4 x the per-process batch
            loss_on_prompt=False,  # also train on prompt tokens
            chunk_chars=0,  # 'text' / 'stdlib': chunk size in characters; 0 means seq_len - 1
            max_files=0,  # 'stdlib': use at most this many files per split; 0 means all
            num_problems=1 << 20,  # arithmetic / synthetic: problem indices per training epoch
            eval_examples=512,  # arithmetic / synthetic: held-out examples in the eval split (synthetic: per length)
            task_length=256,  # synthetic: prompt symbols of a training example (the paper's sequence length)
            num_memorize=16,  # selective_copying: data symbols to copy
            task_vocab=16,  # synthetic: distinct data/key symbols (noise, marker and trigger are extra)
            eval_lengths=(),  # synthetic: task lengths for --task length_generalization; () means task_length
            prefetch=2,  # batches prepared ahead in one background thread; 0 disables
            seed=0,  # used when make_dataset gets no seed
        )
    )


def validate(data_cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the offending field and the fix."""

    def need(ok, message):
        if not ok:
            raise ValueError(message)

    c = data_cfg
    need(c.source in SOURCES, f"data.source={c.source!r} is unknown; set it to one of {', '.join(map(repr, SOURCES))}.")
    need(
        c.variant in DATA_VARIANTS,
        f"data.variant={c.variant!r} is unknown; set it to one of {', '.join(map(repr, DATA_VARIANTS))}.",
    )
    need(1 <= c.context_problems <= CONTEXT_STRIDE // 2,
         f"data.context_problems={c.context_problems} is outside 1..{CONTEXT_STRIDE // 2}; set it within that range.")
    need(0 <= c.cot_fraction <= 1, f"data.cot_fraction={c.cot_fraction} is outside [0, 1]; set a share in [0, 1].")
    need(
        c.tokenizer in TOKENIZERS,
        f"data.tokenizer={c.tokenizer!r} is unknown; set it to one of {', '.join(map(repr, TOKENIZERS))}.",
    )
    need(
        c.tokenizer != "sentencepiece" or c.spm_model,
        "data.spm_model is empty; set it to a SentencePiece .model file when data.tokenizer='sentencepiece'.",
    )
    for name in ("min_steps", "max_steps"):
        need(1 <= c[name] <= MAX_STEPS, f"data.{name}={c[name]} is outside 1..{MAX_STEPS}; set it within that range.")
    need(
        c.min_steps <= c.max_steps,
        f"data.min_steps={c.min_steps} exceeds data.max_steps={c.max_steps}; make min_steps <= max_steps.",
    )
    if c.source in ("text", "jsonl"):
        need(
            len(c.paths) > 0,
            f"data.paths is empty; list the {c.source} files to train on when data.source={c.source!r}.",
        )
    need(0 <= c.seed < 2**32, f"data.seed={c.seed} is outside 0..2**32-1; choose a seed in that range.")
    for name in ("pack_bins", "chunk_chars", "max_files", "prefetch"):
        need(c[name] >= 0, f"data.{name}={c[name]} is negative; set it to 0 or more.")
    for name in ("num_problems", "eval_examples"):
        need(c[name] >= 1, f"data.{name}={c[name]} is less than 1; set it to a positive count.")
    need(c.num_memorize >= 1, f"data.num_memorize={c.num_memorize} is less than 1; set a positive count.")
    need(2 <= c.task_vocab <= len(TASK_SYMBOLS),
         f"data.task_vocab={c.task_vocab} is outside 2..{len(TASK_SYMBOLS)}; set it within that range.")
    lengths = tuple(c.eval_lengths)
    need(all(isinstance(n, int) and not isinstance(n, bool) for n in lengths),
         f"data.eval_lengths={lengths!r} holds a non-integer; list integer task lengths, e.g. (256, 1024).")
    if c.source in SYNTHETIC_SOURCES:
        need(c.tokenizer == "byte", f"data.tokenizer={c.tokenizer!r} does not give one token per symbol of "
                                    f"data.source={c.source!r}; set data.tokenizer='byte'.")
        least = min_task_length(c.source, c.num_memorize)
        why = "data.num_memorize + 1" if c.source == "selective_copying" else "trigger, key, trigger"
        for name, values in (("task_length", (c.task_length,)), ("eval_lengths", lengths)):
            short = [n for n in values if n < least]
            need(not short, f"data.{name} has {short[0] if short else ''}, below {least} ({why}), the least length "
                            f"of data.source={c.source!r}; use lengths >= {least}.")


# ----------------------------------------------------------------------------------------------
# Tokenizers


def content_ids(tokenizer, ids: Sequence[int]) -> list[int]:
    """``ids`` up to the first eos, without pad, bos or ids outside the tokenizer's vocabulary."""
    kept = []
    for i in map(int, ids):
        if i == tokenizer.eos_id:
            break
        if i not in (tokenizer.pad_id, tokenizer.bos_id) and 0 <= i < tokenizer.vocab_size:
            kept.append(i)
    return kept


class ByteTokenizer:
    """UTF-8 bytes offset by 3: pad=0, bos=1, eos=2, byte b -> b + 3; vocab_size = 259."""

    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Stops at eos, skips pad/bos (and any id outside the vocabulary); bad UTF-8 becomes U+FFFD."""
        out = bytearray()
        for i in map(int, ids):
            if i == self.eos_id:
                break
            if self.offset <= i < self.vocab_size:
                out.append(i - self.offset)
        return out.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece model behind the same interface as `ByteTokenizer`.

    bos/eos come from the model (it must define both). pad is the model's pad piece, or its unk
    piece when it has none (padding positions are masked, so the id only needs to be valid).
    """

    def __init__(self, model_file: str):
        import sentencepiece  # Only needed for this tokenizer.

        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model file not found: {model_file}")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot load SentencePiece model {model_file}: {e}") from e
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(
                f"SentencePiece model {model_file} has no bos or eos piece; train it with bos_id and eos_id set."
            )
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.unk_id()
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Stops at eos, skips pad/bos and ids outside the vocabulary."""
        return self._sp.decode(content_ids(self, ids))


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def make_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer named by ``data_cfg.tokenizer``: 'byte', or 'sentencepiece' loading ``data_cfg.spm_model``."""
    validate(data_cfg)
    if data_cfg.tokenizer == "sentencepiece":
        return SentencePieceTokenizer(data_cfg.spm_model)
    return ByteTokenizer()


# ----------------------------------------------------------------------------------------------
# The embedded arithmetic corpus
#
# A problem is a start value in 0..99 and 1..8 operations applied left to right (no precedence):
#   +n, -n      n in 1..9, only while the value stays in 0..99
#   *n          n in 2..5, only while the value stays <= 99 (and the value is >= 1)
#   /2          integer halving (floor)
#   %n          remainder, n in 3..9
# Every symbol is one byte. Example:
#   prompt  'Q:7+3*2/2%5\nA:'
#   cot     '+3=10*2=20/2=10%5=0.The answer is 0.'
#   direct  'The answer is 0.'


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


def _stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


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
    rng = random.Random(_stable_hash(f"arith/{seed}/{index}/{num_steps}"))
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


HELDOUT_PER_MILLE = 100


def is_heldout(prompt: str) -> bool:
    """Whether a question belongs to the held-out set (~10%, decided by a stable hash of its text)."""
    return _stable_hash(prompt) % 1000 < HELDOUT_PER_MILLE


def problem_steps(seed: int, index: int, min_steps: int, max_steps: int) -> int:
    """The number of operations of problem `index` in a stream mixing min_steps..max_steps."""
    return min_steps + _stable_hash(f"steps/{seed}/{index}") % (max_steps - min_steps + 1)


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


CONTEXT_STRIDE = 16  # problem indices reserved per mixture context (held-out ones are skipped)


def mixture_context(seed: int, index: int, min_steps: int = 1, max_steps: int = MAX_STEPS,
                    context_problems: int = 4, cot_fraction: float = 0.5) -> str:
    """Context `index` of the 'mixture' stream: 1..context_problems training problems in one style.

    The style (chain-of-thought with probability `cot_fraction`, else direct) and the count are
    drawn per context from a stable hash; problems come from indices index * CONTEXT_STRIDE + j,
    skipping held-out questions. The text is what `train.cot.build_prompt(compact=True)` writes
    for the exemplars, without the final blank line:
        'Q:7+3\nA:+3=10.The answer is 10.\n\nQ:5*2\nA:*2=10.The answer is 10.'
    """
    rng = random.Random(_stable_hash(f"context/{seed}/{index}"))
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


_ANSWER = re.compile(r"The answer is (-?\d+)\.")


def extract_answer(text: str) -> int | None:
    """The N of the first 'The answer is N.' in text, or None."""
    match = _ANSWER.search(text)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------
# The Mamba paper's synthetic tasks (Gu & Dao 2023, section 4.1, appendix E.1)
#
# Every symbol is one byte, so with the byte tokenizer one symbol is one token. Data and key
# symbols are the first ``task_vocab`` of TASK_SYMBOLS; noise, marker and trigger never occur
# among them. Examples with task_length 12:
#   selective_copying (num_memorize 3)   prompt '..c...ab...='    completion 'cab'
#   induction_heads                      prompt 'bd#kacdbaab#'    completion 'k'

TASK_SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
NOISE, COPY_MARKER, TRIGGER = ".", "=", "#"
TASK_SPLITS = ("train", "eval")


def min_task_length(source: str, num_memorize: int = 16) -> int:
    """The shortest task_length a synthetic source can generate."""
    return num_memorize + 1 if source == "selective_copying" else 3


def synthetic_completion_length(data_cfg: ml_collections.ConfigDict) -> int:
    """Completion symbols of one example: num_memorize for selective copying, 1 for induction heads."""
    return data_cfg.num_memorize if data_cfg.source == "selective_copying" else 1


def synthetic_example_tokens(data_cfg: ml_collections.ConfigDict, length: int | None = None) -> int:
    """The row length one example needs (bos + prompt + completion, whose inputs end before eos)."""
    length = data_cfg.task_length if length is None else length
    return 1 + length + synthetic_completion_length(data_cfg)


def selective_copying(rng: random.Random, length: int, num_memorize: int, vocab: int) -> Record:
    """``length - 1`` positions of noise holding ``num_memorize`` data symbols at random (sorted)
    positions, then the marker; the completion is the data symbols in order."""
    body = [NOISE] * (length - 1)
    symbols = rng.choices(TASK_SYMBOLS[:vocab], k=num_memorize)
    for position, symbol in zip(sorted(rng.sample(range(length - 1), num_memorize)), symbols):
        body[position] = symbol
    return "".join(body) + COPY_MARKER, "".join(symbols)


def induction_heads(rng: random.Random, length: int, vocab: int) -> Record:
    """``length - 1`` random symbols with the trigger once, at a uniform position followed by the
    key, then the trigger again as the last prompt symbol; the completion is the key."""
    body = rng.choices(TASK_SYMBOLS[:vocab], k=length - 1)
    position = rng.randrange(length - 2)  # the key at position + 1 <= length - 2
    body[position] = TRIGGER
    return "".join(body) + TRIGGER, body[position + 1]


def synthetic_record(source: str, seed: int, index: int, length: int, split: str = "train", num_memorize: int = 16,
                     vocab: int = 16) -> Record:
    """Example ``index`` of a synthetic task's ``split`` stream: a pure function of its arguments.

    The 'train' and 'eval' streams are seeded by different strings, so a held-out example is not
    a training example with another index (beyond chance; at the paper's lengths none collide)."""
    if source not in SYNTHETIC_SOURCES:
        raise ValueError(f"source={source!r} is not a synthetic task; use one of {SYNTHETIC_SOURCES}.")
    if split not in TASK_SPLITS:
        raise ValueError(f"split={split!r} is unknown; use 'train' or 'eval'.")
    if not 2 <= vocab <= len(TASK_SYMBOLS):
        raise ValueError(f"vocab={vocab} is outside 2..{len(TASK_SYMBOLS)}.")
    if length < min_task_length(source, num_memorize) or num_memorize < 1:
        raise ValueError(f"length={length} is shorter than {min_task_length(source, num_memorize)}, "
                         f"the least for {source!r}.")
    rng = random.Random(_stable_hash(f"{source}/{split}/{seed}/{index}/{length}/{num_memorize}/{vocab}"))
    if source == "selective_copying":
        return selective_copying(rng, length, num_memorize, vocab)
    return induction_heads(rng, length, vocab)


def synthetic_heldout(data_cfg: ml_collections.ConfigDict, length: int, seed: int | None = None) -> list[Record]:
    """The first ``data_cfg.eval_examples`` examples of the 'eval' stream at task length ``length``."""
    c = data_cfg
    seed = c.seed if seed is None else seed
    return [synthetic_record(c.source, seed, i, length, "eval", c.num_memorize, c.task_vocab)
            for i in range(c.eval_examples)]


# ----------------------------------------------------------------------------------------------
# Files and the standard library corpus


def _read_text(path: str | os.PathLike) -> str:
    """A UTF-8 file's text; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found (or not a regular file): {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OSError(f"cannot read data file {path}: {e.strerror or e}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte {e.start}") from None


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Consecutive pieces of at most `max_chars` characters, cut at line ends where possible.

    Lines longer than `max_chars` are cut inside; pieces that are only whitespace are dropped.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars={max_chars} must be at least 1.")
    chunks, buf, size = [], [], 0
    for line in text.splitlines(keepends=True):
        for piece in (line[i : i + max_chars] for i in range(0, len(line), max_chars)):
            if buf and size + len(piece) > max_chars:
                chunks.append("".join(buf))
                buf, size = [], 0
            buf.append(piece)
            size += len(piece)
    if buf:
        chunks.append("".join(buf))
    return [c for c in chunks if c.strip()]


def read_text_documents(paths: Sequence[str]) -> list[str]:
    """The documents of text files: each file split on blank lines, in file order."""
    docs = []
    for path in paths:
        docs.extend(d.strip("\n") for d in re.split(r"\n(?:[ \t\r\f\v]*\n)+", _read_text(path)) if d.strip())
    return docs


def read_jsonl_records(paths: Sequence[str]) -> list[Record]:
    """(prompt, completion) pairs from JSONL files: `text` gives ('', text).

    Blank lines are skipped; any other malformed line raises ValueError naming file and line (1-based).
    """
    records = []
    for path in paths:
        for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno}).") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
            if isinstance(obj.get("text"), str):
                records.append(("", obj["text"]))
            elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
                records.append((obj["prompt"], obj["completion"]))
            else:
                raise ValueError(f"{where}: expected a string field 'text' or string fields 'prompt' and 'completion'.")
    return records


STDLIB_EVAL_PERCENT = 5


def stdlib_split(relative_path: str) -> str:
    """'eval' for ~5% of standard-library files (stable hash of the relative path), else 'train'."""
    return "eval" if _stable_hash(relative_path) % 100 < STDLIB_EVAL_PERCENT else "train"


def stdlib_files(split: str = "train", max_files: int = 0) -> list[Path]:
    """Sorted `.py` files of the standard library in `split` (first `max_files` when > 0).

    Third-party packages (site-packages, dist-packages) are excluded.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is unknown; use 'train' or 'eval'.")
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")]
        base = Path(dirpath).relative_to(root)
        relative.extend((base / f).as_posix() for f in filenames if f.endswith(".py"))
    chosen = [r for r in sorted(relative) if stdlib_split(r) == split]
    if max_files:
        chosen = chosen[:max_files]
    return [root / r for r in chosen]


def stdlib_documents(split: str = "train", max_files: int = 0) -> list[str]:
    """The text of `stdlib_files(split, max_files)`; undecodable bytes become U+FFFD."""
    return [f.read_bytes().decode("utf-8", errors="replace") for f in stdlib_files(split, max_files)]


# ----------------------------------------------------------------------------------------------
# Examples


def encode_example(record: Record, tokenizer: Tokenizer, seq_len: int, loss_on_prompt: bool) -> dict[str, np.ndarray]:
    """One example as int32 arrays of length n <= seq_len: inputs, targets, loss_mask.

    e = [bos] + prompt_ids + completion_ids + [eos], cut to seq_len + 1 tokens;
    inputs = e[:-1], targets = e[1:], loss_mask is 1 where the target is a completion token or eos
    (every target when loss_on_prompt).
    """
    prompt, completion = record
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    tokens = np.array([tokenizer.bos_id, *prompt_ids, *tokenizer.encode(completion), tokenizer.eos_id], np.int32)[
        : seq_len + 1
    ]
    loss_mask = np.ones(len(tokens) - 1, np.int32)
    if not loss_on_prompt:
        loss_mask[: len(prompt_ids)] = 0
    return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask}


def _pad_example(example: dict[str, np.ndarray], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example alone in a row of length seq_len (segment 1)."""
    n = len(example["inputs"])
    row = {}
    for key in ("inputs", "targets"):
        row[key] = np.full(seq_len, pad_id, np.int32)
        row[key][:n] = example[key]
    row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    row["positions"] = np.where(row["segment_ids"] == 1, np.arange(seq_len), 0).astype(np.int32)
    row["loss_mask"] = np.zeros(seq_len, np.int32)
    row["loss_mask"][:n] = example["loss_mask"]
    return row


def _rename_packed(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": row["inputs"],
        "targets": row["targets"],
        "segment_ids": row["inputs_segment_ids"],
        "positions": row["inputs_positions"],
        "loss_mask": row["loss_mask"],
    }


def _stack_rows(rows: Sequence[dict[str, np.ndarray]], num_rows: int, pad_id: int) -> dict[str, np.ndarray]:
    """Stacks rows into [num_rows, seq_len] arrays, adding empty (all-padding) rows when short."""
    batch = {}
    for key in BATCH_KEYS:
        stacked = np.stack([r[key] for r in rows]).astype(np.int32, copy=False)
        missing = num_rows - len(rows)
        if missing:
            fill = pad_id if key in ("inputs", "targets") else 0
            stacked = np.concatenate([stacked, np.full((missing, stacked.shape[1]), fill, np.int32)])
        batch[key] = stacked
    return batch


def _records(data_cfg: ml_collections.ConfigDict, split: str, seed: int, seq_len: int) -> grain.MapDataset:
    """A MapDataset of Records for `split` (for arithmetic training, None marks a held-out index)."""
    c = data_cfg
    if c.source == "arithmetic":
        if split == "train" and c.variant == "mixture":

            def context(index):
                return ("", mixture_context(seed, index, c.min_steps, c.max_steps, c.context_problems, c.cot_fraction))

            return grain.MapDataset.range(c.num_problems).map(context)
        if split == "train":

            def record(index):
                problem = training_problem(seed, index, c.min_steps, c.max_steps)
                return None if problem is None else (problem.prompt, problem.completion(c.variant))

            return grain.MapDataset.range(c.num_problems).map(record)
        counts = np.diff(np.linspace(0, c.eval_examples, c.max_steps - c.min_steps + 2).astype(int))
        problems = [
            p
            for steps, n in zip(range(c.min_steps, c.max_steps + 1), counts)
            for p in heldout_problems(steps, int(n), seed)
        ]
        # 'mixture' evaluates single problems, alternately in each style.
        styles = [c.variant if c.variant != "mixture" else VARIANTS[i % 2] for i in range(len(problems))]
        return grain.MapDataset.source([(p.prompt, p.completion(v)) for p, v in zip(problems, styles)])

    if c.source in SYNTHETIC_SOURCES:
        need_len = synthetic_example_tokens(c)
        if seq_len < need_len:
            raise ValueError(f"train.seq_len={seq_len} is shorter than an example of data.source={c.source!r} at "
                             f"data.task_length={c.task_length} ({need_len} tokens: bos, prompt, completion); "
                             f"set train.seq_len >= {need_len}.")
        if split == "train":
            return grain.MapDataset.range(c.num_problems).map(
                lambda index: synthetic_record(c.source, seed, index, c.task_length, "train", c.num_memorize,
                                               c.task_vocab))
        return grain.MapDataset.source(synthetic_heldout(c, c.task_length, seed))

    if c.source in ("text", "jsonl"):
        paths = list(c.paths if split == "train" else c.eval_paths)
        if not paths:
            raise ValueError(f"data.eval_paths is empty; list held-out {c.source} files to evaluate on.")
        if c.source == "jsonl":
            records = read_jsonl_records(paths)
        else:
            docs = read_text_documents(paths)
            records = [("", chunk) for d in docs for chunk in chunk_text(d, c.chunk_chars or seq_len - 1)]
    else:
        docs = stdlib_documents(split, c.max_files)
        records = [("", chunk) for d in docs for chunk in chunk_text(d, c.chunk_chars or seq_len - 1)]
    if not records:
        raise ValueError(f"data.source={c.source!r} gave no examples for split {split!r}; check the files it reads.")
    return grain.MapDataset.source(records)


def example_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    split: str = "train",
    seed: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """This process's examples before packing, as `encode_example` dicts (None where skipped).

    Training data is shuffled with `seed` (reshuffled each epoch) and repeats forever; eval data is
    finite and unshuffled. Process p takes elements p, p + P, p + 2P, ... of the global order.
    """
    validate(data_cfg)
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is unknown; use 'train' or 'eval'.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside 0..{process_count - 1}.")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2.")
    seed = data_cfg.seed if seed is None else seed
    ds = _records(data_cfg, split, seed, seq_len)
    if split == "train":
        ds = ds.shuffle(seed)
    if len(ds) < process_count:
        raise ValueError(f"{len(ds)} {split} examples cannot be shared among {process_count} processes; add data.")
    ds = ds[process_index::process_count]
    if split == "train":
        ds = ds.repeat()
    return ds.map(
        functools.partial(encode_example, tokenizer=tokenizer, seq_len=seq_len, loss_on_prompt=data_cfg.loss_on_prompt)
    )


def make_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    batch_size: int,
    split: str = "train",
    seed: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Batches for this process: dicts of int32 arrays [batch_size // process_count, seq_len].

    Keys: inputs, targets, segment_ids, positions, loss_mask (see the module docstring).
    `seed` defaults to data_cfg.seed. Iterate with `iter(ds)`; the iterator has get_state/set_state.
    """
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be a positive multiple of process_count={process_count}.")
    rows = batch_size // process_count
    seed = data_cfg.seed if seed is None else seed
    examples = example_dataset(
        data_cfg,
        tokenizer=tokenizer,
        seq_len=seq_len,
        split=split,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    # In-memory work: no reader threads (they would only contend for the GIL).
    ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    pad_id = tokenizer.pad_id
    if data_cfg.packing:
        lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
        # Only `inputs` gets segment ids and positions; the other features follow its layout.
        ds = grain.experimental.FirstFitPackIterDataset(
            ds,
            length_struct=lengths,
            num_packing_bins=data_cfg.pack_bins or 4 * rows,
            seed=seed,
            shuffle_bins=split == "train",
            meta_features=("targets", "loss_mask"),
            padding_struct={"inputs": pad_id, "targets": pad_id, "loss_mask": 0},
        )
        ds = ds.map(_rename_packed)
    else:
        ds = ds.map(functools.partial(_pad_example, seq_len=seq_len, pad_id=pad_id))
    ds = ds.batch(
        rows, drop_remainder=split == "train", batch_fn=functools.partial(_stack_rows, num_rows=rows, pad_id=pad_id)
    )
    if data_cfg.prefetch:
        ds = _Prefetch(ds, data_cfg.prefetch)
    return ds


_PREFETCHERS: weakref.WeakSet = weakref.WeakSet()


class _Prefetch(grain.IterDataset):
    """Prepares `buffer_size` elements ahead in one background thread (Grain's thread prefetch)."""

    def __init__(self, parent: grain.IterDataset, buffer_size: int):
        super().__init__(parent)
        self._buffer_size = buffer_size

    def __iter__(self):
        iterator = _PrefetchIterator(self._parent.__iter__(), self._buffer_size)
        _PREFETCHERS.add(iterator)
        return iterator


class _PrefetchIterator(grain.experimental.ThreadPrefetchDatasetIterator):
    """A prefetch thread still running while the interpreter finalizes can abort the process, so
    live iterators are closed by an atexit hook (before daemon threads are torn down), and closing
    twice is a no-op (Grain's close fails once module globals are gone)."""

    def close(self):
        if not self._closed:
            super().close()


@atexit.register
def _close_prefetchers():
    for iterator in list(_PREFETCHERS):
        iterator.close()


def batch_examples(batch: dict[str, np.ndarray]) -> list[tuple[int, ...]]:
    """The examples in a batch as token tuples e = inputs of the segment + its last target.

    Inverse of packing, used by tests and debugging: one tuple per (row, segment), in row order.
    """
    out = []
    for inputs, targets, segments in zip(batch["inputs"], batch["targets"], batch["segment_ids"]):
        for s in np.unique(segments[segments > 0]):
            where = segments == s
            out.append(tuple(inputs[where].tolist()) + (int(targets[where][-1]),))
    return out
