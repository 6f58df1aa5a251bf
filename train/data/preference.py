"""Preference pairs from JSONL files (``data.source='preference'``): prompt, chosen and rejected responses,
an optional soft label and optional reference log-probabilities, as plain strings or chat-message lists.

One JSON object per line (blank lines skipped), either
    {"prompt": "Q:2+3\\nA:", "chosen": "The answer is 5.", "rejected": "The answer is 6."}
or chat messages ({"role": "system" | "user" | "assistant", "content": str}):
    {"chosen":   [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}],
     "rejected": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "6"}]}
where the two conversations share every message but the last (an assistant message), or where
"prompt" is a message list and "chosen"/"rejected" are single assistant messages or strings. Chat
messages become text through `apply_chat_template`; the prompt ends with the assistant header so the
response's log-probability covers only the assistant's words (and eos).

Optional fields: "label", the probability in [0, 1] that chosen is preferred (AI-feedback pairs; 1 by
default), and "ref_chosen_logp" / "ref_rejected_logp" (the reference model's summed response
log-probabilities, see `train.orpo.reference_logps`), required when ``data.reference_logps``.

A record's pair becomes two `encode_example` arrays (`encode_preference`) plus per-pair float32
features spread over every token of the pair's segment ("label", and "chosen_ref_logp",
"rejected_ref_logp"), so packing and padding carry them like the token arrays. Errors name the file
and the 1-based line: malformed JSON, missing or mistyped fields, an empty response, a label outside
[0, 1], a prompt that alone fills ``seq_len``, a pair longer than ``seq_len`` (unless ``data.truncate``
cuts the responses). Records whose responses are identical (as written, or once cut) teach nothing
and are dropped; the count is logged.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from absl import logging

from models.tokenizers import Tokenizer
from train.data.text import jsonl_objects

ROLES = ("system", "user", "assistant")
PAIR_FEATURES = ("label",)                               # every preference batch
REFERENCE_FEATURES = ("chosen_ref_logp", "rejected_ref_logp")  # with data.reference_logps


class PreferenceRecord(NamedTuple):
    """One pair: the text the model sees (prompt, chosen, rejected), its soft label, the reference
    model's summed response log-probs (NaN when absent) and where it came from ('file, line N')."""
    prompt: str
    chosen: str
    rejected: str
    label: float = 1.0
    ref_chosen_logp: float = float("nan")
    ref_rejected_logp: float = float("nan")
    where: str = ""


def apply_chat_template(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """Messages as text: each '<|role|>\\n' + content + '\\n'; with ``add_generation_prompt`` the
    assistant header '<|assistant|>\\n' is appended (the prompt of a response)."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def _messages(value, where: str, field: str) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    ok = isinstance(value, list) and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise ValueError(f"{where}: field {field!r} must be a string or a list of messages "
                         f"{{'role': one of {ROLES}, 'content': str}}.")
    return value


def _response(value, where: str, field: str) -> str:
    """An assistant response as text (a string, or one assistant message ended by a newline)."""
    if isinstance(value, str):
        return value
    messages = _messages(value, where, field)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"{where}: field {field!r} must be one assistant message when 'prompt' is given.")
    return messages[0]["content"] + "\n"


def parse_record(obj, where: str, reference: bool = False) -> PreferenceRecord:
    """One JSON object as a PreferenceRecord; ValueError naming ``where`` for anything malformed."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
    for field in ("chosen", "rejected"):
        if field not in obj:
            raise ValueError(f"{where}: missing field {field!r}.")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            prompt = apply_chat_template(_messages(prompt, where, "prompt"), add_generation_prompt=True)
        chosen, rejected = (_response(obj[f], where, f) for f in ("chosen", "rejected"))
    else:
        sides = [_messages(obj[f], where, f) for f in ("chosen", "rejected")]
        if any(not s or s[-1]["role"] != "assistant" for s in sides) or sides[0][:-1] != sides[1][:-1]:
            raise ValueError(f"{where}: without 'prompt', 'chosen' and 'rejected' must be conversations that "
                             f"share every message but the last, an assistant message.")
        prompt = apply_chat_template(sides[0][:-1], add_generation_prompt=True)
        chosen, rejected = (s[-1]["content"] + "\n" for s in sides)
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        if not response.strip():
            raise ValueError(f"{where}: the {field!r} response is empty.")
    label = obj.get("label", 1.0)
    if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0.0 <= label <= 1.0:
        raise ValueError(f"{where}: field 'label' is {label!r}; give the probability in [0, 1] that chosen is "
                         f"preferred.")
    refs = []
    for field in ("ref_chosen_logp", "ref_rejected_logp"):
        value = obj.get(field)
        if value is None and reference:
            raise ValueError(f"{where}: missing field {field!r} (data.reference_logps=True); add the reference "
                             f"model's log-probs with train.orpo.reference_logps.")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: field {field!r} is {value!r}; give a number.")
        refs.append(float("nan") if value is None else float(value))
    return PreferenceRecord(prompt, chosen, rejected, float(label), *refs, where)


def read_preference_jsonl(paths: Sequence[str], reference: bool = False) -> list[PreferenceRecord]:
    """Every record of the JSONL ``paths``, in order (blank lines skipped); see the module docstring."""
    return [parse_record(obj, where, reference) for obj, where in jsonl_objects(paths)]


def fit_records(records: Sequence[PreferenceRecord], tokenizer: Tokenizer, seq_len: int,
                truncate: bool = False) -> tuple[list[PreferenceRecord], dict]:
    """The records that fit ``seq_len`` (bos + prompt + response + eos - 1 tokens), and counts.

    A prompt that leaves no room for a response token raises ValueError naming the record; a longer
    pair raises too unless ``truncate``, which cuts each response to fit. Pairs whose responses are
    equal (as written or once cut) are dropped. Returns (kept, {'cut': n, 'dropped': n}); the counts
    are logged."""
    kept, cut, dropped = [], 0, 0
    for r in records:
        prompt_ids = tokenizer.encode(r.prompt) if r.prompt else []
        room = seq_len - 1 - len(prompt_ids)  # response tokens that fit with bos, prompt and eos
        if room < 1:
            raise ValueError(f"{r.where}: the prompt takes {len(prompt_ids)} tokens, leaving no room for a response "
                             f"in train.seq_len={seq_len}; raise train.seq_len or shorten the prompt.")
        ids = [tokenizer.encode(x) for x in (r.chosen, r.rejected)]
        if max(map(len, ids)) > room:
            if not truncate:
                need = 1 + len(prompt_ids) + max(map(len, ids))
                raise ValueError(f"{r.where}: the pair needs {need} tokens, more than train.seq_len={seq_len}; raise "
                                 f"train.seq_len or set data.truncate=True to cut the responses.")
            cut += 1
            ids = [i[:room] for i in ids]
            r = r._replace(chosen=tokenizer.decode(ids[0]), rejected=tokenizer.decode(ids[1]))
        if ids[0] == ids[1]:
            dropped += 1
            continue
        kept.append(r)
    if cut or dropped:
        logging.warning("preference data: %d of %d pairs cut to train.seq_len=%d, %d dropped (identical chosen and "
                        "rejected responses).", cut, len(records), seq_len, dropped)
    return kept, {"cut": cut, "dropped": dropped}


def encode_preference(record: PreferenceRecord, tokenizer: Tokenizer, seq_len: int, loss_on_prompt: bool,
                      reference: bool = False) -> dict[str, np.ndarray]:
    """`pipeline.encode_pair` arrays of the pair, plus float32 per-pair features over every token of
    the (longer) side: "label" and, with ``reference``, "chosen_ref_logp" and "rejected_ref_logp"."""
    from train.data.pipeline import encode_pair  # the pipeline imports this module

    out = encode_pair((record.prompt, record.chosen, record.rejected), tokenizer, seq_len, loss_on_prompt)
    values = {"label": record.label}
    if reference:
        values.update(chosen_ref_logp=record.ref_chosen_logp, rejected_ref_logp=record.ref_rejected_logp)
    n = len(out["chosen_inputs"])
    for key, value in values.items():
        out[key] = np.full(n, value, np.float32)  # packed with the chosen side (same segment as the rejected)
    return out


def pair_features(data_cfg) -> tuple[str, ...]:
    """The float per-pair feature keys of a 'preference' batch."""
    return PAIR_FEATURES + (REFERENCE_FEATURES if data_cfg.reference_logps else ())
