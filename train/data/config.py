"""The data section of an experiment config: its defaults, its validation, the batch keys it yields
and the tokenizer it names."""
from __future__ import annotations

import ml_collections

from models.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer
from train.data.arithmetic import CONTEXT_STRIDE, MAX_STEPS, VARIANTS
from train.data.synthetic import SYNTHETIC_SOURCES, TASK_SYMBOLS, min_task_length

PAIR_SOURCES = ("arithmetic_pairs", "preference")
SOURCES = ("arithmetic", "text", "jsonl", "stdlib") + SYNTHETIC_SOURCES + PAIR_SOURCES
DATA_VARIANTS = VARIANTS + ("mixture",)
TOKENIZERS = ("byte", "sentencepiece")
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
PAIR_SIDES = ("chosen", "rejected")
PAIR_KEYS = tuple(f"{side}_{key}" for side in PAIR_SIDES for key in BATCH_KEYS)


def default_config() -> ml_collections.ConfigDict:
    """The data section of an experiment config."""
    return ml_collections.ConfigDict(
        dict(
            # 'arithmetic' | 'arithmetic_pairs' | 'preference' | 'text' | 'jsonl' | 'stdlib' | 'selective_copying' |
            # 'induction_heads'
            source="arithmetic",
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
            reference_logps=False,  # 'preference': records carry ref_chosen_logp / ref_rejected_logp (for DPO)
            # An example longer than train.seq_len (+1 for the shifted targets) is refused with a count and the
            # longest length (False), or cut to fit, the count logged (True). Chunks of 'text' / 'stdlib' at
            # chunk_chars=0 are cut to fit either way (a chunk of seq_len - 1 characters can exceed seq_len tokens).
            truncate=False,
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


def batch_keys(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The keys of the batches ``data_cfg`` yields: PAIR_KEYS for a paired source (with 'preference', also its
    float per-pair features: `train.data.preference.pair_features`), else BATCH_KEYS."""
    if data_cfg.source == "preference":
        from train.data.preference import pair_features
        return PAIR_KEYS + pair_features(data_cfg)
    return PAIR_KEYS if data_cfg.source in PAIR_SOURCES else BATCH_KEYS


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
    need(c.source != "arithmetic_pairs" or c.variant in VARIANTS,
         f"data.variant={c.variant!r} has no preference pairs; set it to one of {', '.join(map(repr, VARIANTS))} "
         f"for data.source={c.source!r}.")
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
    if c.source in ("text", "jsonl", "preference"):
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


def make_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The tokenizer named by ``data_cfg.tokenizer``: 'byte', or 'sentencepiece' loading ``data_cfg.spm_model``."""
    validate(data_cfg)
    if data_cfg.tokenizer == "sentencepiece":
        return SentencePieceTokenizer(data_cfg.spm_model)
    return ByteTokenizer()
