"""The Grain pipeline: a source's records, tokenized, packed several to a row (or padded one to a
row) and batched; the batch layout is described in the package docstring (`train.data`).

A record becomes ``e = [bos] + prompt_ids + completion_ids + [eos]`` (cut to ``seq_len + 1``
tokens), with ``inputs = e[:-1]`` and ``targets = e[1:]``. A preference pair (prompt, chosen,
rejected) becomes two such examples, packed as one unit: the chosen example into a row of the
``chosen_*`` arrays and the rejected one into the same row of the ``rejected_*`` arrays, as the
same segment, so row r, segment s of the chosen side and of the rejected side hold one pair.
"""
from __future__ import annotations

import atexit
import functools
import weakref
from typing import Sequence

import grain
from absl import logging
import ml_collections
import numpy as np

from models.tokenizers import Tokenizer
from train.data import arithmetic, preference, synthetic, text
from train.data.config import BATCH_KEYS, PAIR_SIDES, PAIR_SOURCES, validate
from train.data.records import PairRecord, Record


def _prefixes(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Key prefixes of one example's arrays: '' for LM sources, 'chosen_' and 'rejected_' for pairs."""
    return tuple(f"{side}_" for side in PAIR_SIDES) if data_cfg.source in PAIR_SOURCES else ("",)


def _features(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Float per-pair feature keys (`train.data.preference`) of a source's batches."""
    return preference.pair_features(data_cfg) if data_cfg.source == "preference" else ()


def _too_long(count: int, total: str, longest: int, seq_len: int, source: str) -> str:
    return (f"{count} of {total} examples of data.source={source!r} are longer than train.seq_len={seq_len} tokens "
            f"(the longest needs {longest}); raise train.seq_len to {longest} or set data.truncate=True to cut them.")


def example_length(record, tokenizer: Tokenizer) -> int:
    """The train.seq_len an example (or a pair: its longer side) needs: bos + prompt + completion + eos, minus 1."""
    prompt, *completions = record
    prompt_len = len(tokenizer.encode(prompt)) if prompt else 0
    return 1 + prompt_len + max(len(tokenizer.encode(c)) for c in completions)


def encode_example(record: Record, tokenizer: Tokenizer, seq_len: int, loss_on_prompt: bool, *,
                   truncate: bool = True, source: str = "") -> dict[str, np.ndarray]:
    """One example as int32 arrays of length n <= seq_len: inputs, targets, loss_mask.

    e = [bos] + prompt_ids + completion_ids + [eos], cut to seq_len + 1 tokens (with ``truncate``;
    otherwise a longer example raises ValueError naming train.seq_len and data.truncate);
    inputs = e[:-1], targets = e[1:], loss_mask is 1 where the target is a completion token or eos
    (every target when loss_on_prompt).
    """
    prompt, completion = record
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    tokens = np.array([tokenizer.bos_id, *prompt_ids, *tokenizer.encode(completion), tokenizer.eos_id], np.int32)
    if len(tokens) > seq_len + 1 and not truncate:
        raise ValueError(f"an example of data.source={source!r} is longer than train.seq_len={seq_len} tokens (it needs "
                         f"{len(tokens) - 1}); raise train.seq_len or set data.truncate=True to cut such examples.")
    tokens = tokens[: seq_len + 1]
    loss_mask = np.ones(len(tokens) - 1, np.int32)
    if not loss_on_prompt:
        loss_mask[: len(prompt_ids)] = 0
    return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": loss_mask}


def encode_pair(record: PairRecord, tokenizer: Tokenizer, seq_len: int, loss_on_prompt: bool) -> dict[str, np.ndarray]:
    """A preference pair as `encode_example` arrays of (prompt, chosen) under ``chosen_*`` keys and of
    (prompt, rejected) under ``rejected_*`` keys. A pair longer than seq_len + 1 tokens is refused
    (cut, its two sides could become equal)."""
    prompt, chosen, rejected = record
    out = {}
    for side, completion in zip(PAIR_SIDES, (chosen, rejected)):
        example = encode_example((prompt, completion), tokenizer, seq_len + 1, loss_on_prompt)
        if len(example["inputs"]) > seq_len:
            raise ValueError(f"a preference pair needs {len(example['inputs']) + 1} tokens, more than "
                             f"train.seq_len + 1 = {seq_len + 1}; raise train.seq_len or lower data.max_steps.")
        out.update({f"{side}_{key}": value for key, value in example.items()})
    return out


def _pad_example(example: dict[str, np.ndarray], seq_len: int, pad_id: int,
                 prefixes: Sequence[str] = ("",)) -> dict[str, np.ndarray]:
    """One example (or pair) alone in a row of length seq_len (segment 1)."""
    row = {}
    for p in prefixes:
        n = len(example[p + "inputs"])
        for key in ("inputs", "targets"):
            row[p + key] = np.full(seq_len, pad_id, np.int32)
            row[p + key][:n] = example[p + key]
        row[p + "segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
        row[p + "positions"] = np.where(row[p + "segment_ids"] == 1, np.arange(seq_len), 0).astype(np.int32)
        row[p + "loss_mask"] = np.zeros(seq_len, np.int32)
        row[p + "loss_mask"][:n] = example[p + "loss_mask"]
    for key in preference.PAIR_FEATURES + preference.REFERENCE_FEATURES:  # float per-pair features, if any
        if key in example:
            row[key] = np.zeros(seq_len, np.float32)
            row[key][: len(example[key])] = example[key]
    return row


def _rename_packed(row: dict[str, np.ndarray], prefixes: Sequence[str] = ("",)) -> dict[str, np.ndarray]:
    out = {}
    for p in prefixes:
        out.update({p + "inputs": row[p + "inputs"], p + "targets": row[p + "targets"],
                    p + "segment_ids": row[p + "inputs_segment_ids"], p + "positions": row[p + "inputs_positions"],
                    p + "loss_mask": row[p + "loss_mask"]})
    out.update({k: row[k] for k in preference.PAIR_FEATURES + preference.REFERENCE_FEATURES if k in row})
    return out


def _stack_rows(rows: Sequence[dict[str, np.ndarray]], num_rows: int, pad_id: int,
                keys: Sequence[str] = BATCH_KEYS) -> dict[str, np.ndarray]:
    """Stacks rows into [num_rows, seq_len] arrays, adding empty (all-padding) rows when short."""
    batch = {}
    for key in keys:
        stacked = np.stack([r[key] for r in rows])
        stacked = stacked.astype(np.float32 if stacked.dtype.kind == "f" else np.int32, copy=False)
        missing = num_rows - len(rows)
        if missing:
            fill = pad_id if key.endswith(("inputs", "targets")) else 0
            stacked = np.concatenate([stacked, np.full((missing, stacked.shape[1]), fill, stacked.dtype)])
        batch[key] = stacked
    return batch


def _records(data_cfg: ml_collections.ConfigDict, split: str, seed: int, seq_len: int,
             tokenizer: Tokenizer | None = None) -> grain.MapDataset:
    """A MapDataset of Records (PairRecords for a paired source) for `split`; for arithmetic training,
    None marks a held-out index."""
    c = data_cfg
    if c.source == "arithmetic":
        if split == "train" and c.variant == "mixture":

            def context(index):
                return ("", arithmetic.mixture_context(seed, index, c.min_steps, c.max_steps, c.context_problems,
                                                       c.cot_fraction))

            return grain.MapDataset.range(c.num_problems).map(context)
        if split == "train":

            def record(index):
                problem = arithmetic.training_problem(seed, index, c.min_steps, c.max_steps)
                return None if problem is None else (problem.prompt, problem.completion(c.variant))

            return grain.MapDataset.range(c.num_problems).map(record)
        problems = arithmetic.eval_problems(seed, c.eval_examples, c.min_steps, c.max_steps)
        # 'mixture' evaluates single problems, alternately in each style.
        styles = [c.variant if c.variant != "mixture" else arithmetic.VARIANTS[i % 2] for i in range(len(problems))]
        return grain.MapDataset.source([(p.prompt, p.completion(v)) for p, v in zip(problems, styles)])

    if c.source == "arithmetic_pairs":
        if split == "train":
            return grain.MapDataset.range(c.num_problems).map(
                lambda index: arithmetic.training_pair(seed, index, c.min_steps, c.max_steps, c.variant))
        problems = arithmetic.eval_problems(seed, c.eval_examples, c.min_steps, c.max_steps)
        return grain.MapDataset.source([arithmetic.preference_pair(p, seed, c.variant) for p in problems])

    if c.source == "preference":
        paths = list(c.paths if split == "train" else c.eval_paths)
        if not paths:
            raise ValueError("data.eval_paths is empty; list held-out preference files to evaluate on.")
        records, _ = preference.fit_records(preference.read_preference_jsonl(paths, c.reference_logps), tokenizer,
                                            seq_len, c.truncate)
        if not records:
            raise ValueError(f"data.source='preference' gave no pairs for split {split!r}; check the files it reads.")
        return grain.MapDataset.source(records)

    if c.source in synthetic.SYNTHETIC_SOURCES:
        need_len = synthetic.synthetic_example_tokens(c)
        if seq_len < need_len:
            raise ValueError(f"train.seq_len={seq_len} is shorter than an example of data.source={c.source!r} at "
                             f"data.task_length={c.task_length} ({need_len} tokens: bos, prompt, completion); "
                             f"set train.seq_len >= {need_len}.")
        if split == "train":
            return grain.MapDataset.range(c.num_problems).map(
                lambda index: synthetic.synthetic_record(c.source, seed, index, c.task_length, "train",
                                                         c.num_memorize, c.task_vocab))
        return grain.MapDataset.source(synthetic.synthetic_heldout(c, c.task_length, seed))

    if c.source in ("text", "jsonl"):
        paths = list(c.paths if split == "train" else c.eval_paths)
        if not paths:
            raise ValueError(f"data.eval_paths is empty; list held-out {c.source} files to evaluate on.")
        if c.source == "jsonl":
            records = text.read_jsonl_records(paths)
        else:
            docs = text.read_text_documents(paths)
            records = [("", chunk) for d in docs for chunk in text.chunk_text(d, c.chunk_chars or seq_len - 1)]
    else:
        docs = text.stdlib_documents(split, c.max_files)
        records = [("", chunk) for d in docs for chunk in text.chunk_text(d, c.chunk_chars or seq_len - 1)]
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
    """This process's examples before packing, as `encode_example` dicts (`encode_pair` dicts for a
    paired source; None where skipped).

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
    ds = _records(data_cfg, split, seed, seq_len, tokenizer)
    truncate = check_lengths(ds, data_cfg, tokenizer, seq_len, split)
    if split == "train":
        ds = ds.shuffle(seed)
    if len(ds) < process_count:
        raise ValueError(f"{len(ds)} {split} examples cannot be shared among {process_count} processes; add data.")
    ds = ds[process_index::process_count]
    if split == "train":
        ds = ds.repeat()
    if data_cfg.source == "preference":
        encode = functools.partial(preference.encode_preference, reference=data_cfg.reference_logps)
    elif data_cfg.source in PAIR_SOURCES:
        encode = encode_pair
    else:
        encode = functools.partial(encode_example, truncate=truncate, source=data_cfg.source)
    return ds.map(functools.partial(encode, tokenizer=tokenizer, seq_len=seq_len,
                                    loss_on_prompt=data_cfg.loss_on_prompt))


SCAN_GENERATED = 4096  # examples of a generated training stream (2^20 per epoch) checked up front


def check_lengths(ds: grain.MapDataset, data_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, seq_len: int,
                  split: str) -> bool:
    """Count the examples of ``ds`` (Records, None for skipped) longer than ``seq_len``: every one of a
    file or held-out split, the first SCAN_GENERATED of a generated training stream. Raises ValueError
    (how many, the longest, the fix) unless they may be cut (data.truncate, or the automatic chunks of
    'text' / 'stdlib'), which is logged with the count. Returns whether encoding may cut examples."""
    c = data_cfg
    if c.source in synthetic.SYNTHETIC_SOURCES:  # checked exactly in _records
        return False
    if c.source == "preference":  # checked (and cut with data.truncate) in _records, naming each record
        return bool(c.truncate)
    generated = split == "train" and c.source in ("arithmetic", "arithmetic_pairs")
    n = min(len(ds), SCAN_GENERATED) if generated else len(ds)
    count, longest, seen = 0, 0, 0
    for i in range(n):
        record = ds[i]
        if record is None:
            continue
        seen += 1
        need = example_length(record, tokenizer)
        if need > seq_len:
            count, longest = count + 1, max(longest, need)
    chunked = c.source in ("text", "stdlib") and not c.chunk_chars
    total = f"the first {seen}" if generated and len(ds) > n else f"the {seen} {split}"
    if count and c.source not in PAIR_SOURCES and (c.truncate or chunked):
        logging.warning("%d of %s examples of data.source=%r are longer than train.seq_len=%d tokens (the longest "
                        "needs %d); they are cut to fit (%s).", count, total, c.source, seq_len, longest,
                        "data.truncate=True" if c.truncate else "chunks of data.chunk_chars=0")
        return True
    if count:
        message = _too_long(count, total, longest, seq_len, c.source)
        if c.source in PAIR_SOURCES:  # a pair is never cut: its two sides could become equal
            message = message.replace("or set data.truncate=True to cut them", "or lower data.max_steps")
        raise ValueError(message)
    return bool(c.truncate or chunked)


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

    Keys: `batch_keys(data_cfg)`, BATCH_KEYS or, for a paired source, PAIR_KEYS (see the package
    docstring). `seed` defaults to data_cfg.seed. Iterate with `iter(ds)`; the iterator has
    get_state/set_state.
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
    prefixes = _prefixes(data_cfg)
    if data_cfg.packing:
        lengths = {p + key: seq_len for p in prefixes for key in ("inputs", "targets", "loss_mask")}
        lengths.update({key: seq_len for key in _features(data_cfg)})
        # Only each side's `inputs` gets segment ids and positions; its other features follow that layout.
        ds = grain.experimental.FirstFitPackIterDataset(
            ds,
            length_struct=lengths,
            num_packing_bins=data_cfg.pack_bins or 4 * rows,
            seed=seed,
            shuffle_bins=split == "train",
            meta_features=tuple(k for k in lengths if not k.endswith("inputs")),
            padding_struct={k: pad_id if k.endswith(("inputs", "targets")) else 0 for k in lengths},
        )
        ds = ds.map(functools.partial(_rename_packed, prefixes=prefixes))
    else:
        ds = ds.map(functools.partial(_pad_example, seq_len=seq_len, pad_id=pad_id, prefixes=prefixes))
    keys = tuple(p + key for p in prefixes for key in BATCH_KEYS) + _features(data_cfg)
    ds = ds.batch(rows, drop_remainder=split == "train",
                  batch_fn=functools.partial(_stack_rows, num_rows=rows, pad_id=pad_id, keys=keys))
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


def batch_examples(batch: dict[str, np.ndarray], prefix: str = "") -> list[tuple[int, ...]]:
    """The examples in a batch as token tuples e = inputs of the segment + its last target.

    Inverse of packing, used by tests and debugging: one tuple per (row, segment), in row order.
    ``prefix`` 'chosen_' or 'rejected_' reads one side of a paired batch.
    """
    out = []
    for inputs, targets, segments in zip(batch[prefix + "inputs"], batch[prefix + "targets"],
                                         batch[prefix + "segment_ids"]):
        for s in np.unique(segments[segments > 0]):
            where = segments == s
            out.append(tuple(inputs[where].tolist()) + (int(targets[where][-1]),))
    return out
