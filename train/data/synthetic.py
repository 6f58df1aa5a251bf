"""The Mamba paper's synthetic tasks (Gu & Dao 2023, section 4.1, appendix E.1): selective copying
and induction heads, generated from a seed.

Every symbol is one byte, so with the byte tokenizer one symbol is one token. Data and key
symbols are the first ``task_vocab`` of TASK_SYMBOLS; noise, marker and trigger never occur
among them. Examples with task_length 12:
  selective_copying (num_memorize 3)   prompt '..c...ab...='    completion 'cab'
  induction_heads                      prompt 'bd#kacdbaab#'    completion 'k'
"""
from __future__ import annotations

import random

import ml_collections

from train.data.records import Record, stable_hash

SYNTHETIC_SOURCES = ("selective_copying", "induction_heads")

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
    rng = random.Random(stable_hash(f"{source}/{split}/{seed}/{index}/{length}/{num_memorize}/{vocab}"))
    if source == "selective_copying":
        return selective_copying(rng, length, num_memorize, vocab)
    return induction_heads(rng, length, vocab)


def synthetic_heldout(data_cfg: ml_collections.ConfigDict, length: int, seed: int | None = None) -> list[Record]:
    """The first ``data_cfg.eval_examples`` examples of the 'eval' stream at task length ``length``."""
    c = data_cfg
    seed = c.seed if seed is None else seed
    return [synthetic_record(c.source, seed, i, length, "eval", c.num_memorize, c.task_vocab)
            for i in range(c.eval_examples)]
