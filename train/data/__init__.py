"""Training and evaluation data: corpora that need no download, text files, and the Grain pipeline.

Modules: `config` (the data section: defaults, validation, batch keys, the tokenizer it names),
`arithmetic` (the embedded arithmetic corpus and its preference pairs), `synthetic` (the Mamba
paper's synthetic tasks), `text` (text, JSONL and standard-library files), `pipeline` (tokenizing,
packing, batching), `records` (the example tuples and the stable hash). Tokenizers are
`models.tokenizers`. Everything callers use is importable from here: ``from train import data``.

Sources (``data_cfg.source``):
  * ``'arithmetic'``: the embedded arithmetic corpus, generated from a seed (see `arithmetic_problem`).
    ``data_cfg.variant`` picks the completions: ``'cot'`` (every step), ``'direct'`` (the answer
    only), or ``'mixture'``: multi-example contexts of 1..``context_problems`` problems, each
    context all chain-of-thought (a ``cot_fraction`` of them) or all direct, in the few-shot
    prompt format of `train.cot.build_prompt` (see `mixture_context`); every token is trained on.
  * ``'arithmetic_pairs'``: preference pairs of the same corpus (`preference_pair`): the chosen
    completion is the correct one (``variant`` 'cot' or 'direct'), the rejected one the same with
    a wrong final answer (`wrong_answer`: the correct one +-1..3, from a stable hash of seed and
    question). Training skips held-out questions as ``'arithmetic'`` does; the eval split is its
    held-out problems as pairs. Batches carry PAIR_KEYS (below).
  * ``'preference'``: preference pairs from JSONL files (`train.data.preference`): prompt, chosen and
    rejected as strings or chat messages, an optional soft ``label``, optional reference log-probs
    (``data.reference_logps``). Batches carry PAIR_KEYS and float32 per-pair features ("label", ...)
    spread over each pair's tokens on the chosen side.
  * ``'text'``: UTF-8 text files. Each file is split on blank lines into documents; a document
    longer than the context is cut at line ends into chunks of at most ``seq_len - 1`` characters
    (``data_cfg.chunk_chars`` overrides). Every token is trained on.
  * ``'jsonl'``: one JSON object per line with a string field ``text`` (trained on every token) or
    string fields ``prompt`` and ``completion`` (trained on the completion). One line is one
    example.
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

Every example becomes ``e = [bos] + prompt_ids + completion_ids + [eos]``, with ``inputs = e[:-1]``
and ``targets = e[1:]``. Examples longer than ``seq_len + 1`` tokens are counted before training and
refused (how many, the longest, the fix), or with ``data_cfg.truncate`` cut to fit with the count
logged; the automatic chunks of ``'text'`` and ``'stdlib'`` are cut to fit either way. Examples are packed several to a row
(first fit, never split across rows) or, without packing, one to a row. A batch is a dict of
int32 arrays, all shaped ``[batch_size // process_count, seq_len]`` (BATCH_KEYS):

  inputs       token ids fed to the model (``pad_id`` on padding)
  targets      the next token of the same example (``pad_id`` on padding)
  segment_ids  1, 2, 3, ... for the examples of a row; 0 on padding
  positions    0, 1, 2, ... restarting at every example; 0 on padding
  loss_mask    1 where the target is trained on, 0 on prompt tokens and padding

A paired batch (PAIR_KEYS) holds the same five arrays twice, ``chosen_*`` and ``rejected_*``: a
pair is packed as one unit, so segment s of row r is the same pair's chosen example on one side
and its rejected example on the other (`batch_keys` says which keys a config yields).
The training stream repeats forever and reshuffles each epoch; the eval stream is finite, in a
fixed order, and its last batch is filled up with padding rows so that every batch has one shape.
Iterators support ``get_state()`` / ``set_state()`` for exact resumption.
"""
from models.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer, content_ids
from train.data.arithmetic import (CONTEXT_STRIDE, HELDOUT_PER_MILLE, MAX_OPERAND, MAX_STEPS, MAX_VALUE, VARIANTS,
                                   WRONG_OFFSETS, Problem, apply_op, arithmetic_problem, eval_problems,
                                   exemplar_problems, extract_answer, heldout_problems, is_heldout, mixture_context,
                                   preference_pair, problem_steps, training_pair, training_problem, wrong_answer)
from train.data.config import (BATCH_KEYS, DATA_VARIANTS, PAIR_KEYS, PAIR_SIDES, PAIR_SOURCES, SOURCES, TOKENIZERS,
                               batch_keys, default_config, make_tokenizer, validate)
from train.data.pipeline import batch_examples, encode_example, encode_pair, example_dataset, make_dataset
from train.data.records import PairRecord, Record, stable_hash
from train.data.preference import (PreferenceRecord, apply_chat_template, encode_preference, fit_records,
                                   pair_features, read_preference_jsonl)
from train.data.synthetic import (COPY_MARKER, NOISE, SYNTHETIC_SOURCES, TASK_SPLITS, TASK_SYMBOLS, TRIGGER,
                                  induction_heads, min_task_length, selective_copying, synthetic_completion_length,
                                  synthetic_example_tokens, synthetic_heldout, synthetic_record)
from train.data.text import (STDLIB_EVAL_PERCENT, chunk_text, read_jsonl_records, read_text, read_text_documents,
                             stdlib_documents, stdlib_files, stdlib_split)
