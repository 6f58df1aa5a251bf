"""Tokenizers behind one interface: ``encode(text) -> ids``, ``decode(ids) -> text`` and the ids
``pad_id``, ``bos_id``, ``eos_id`` and ``vocab_size``.

  * `ByteTokenizer`: UTF-8 bytes offset by 3 (pad 0, bos 1, eos 2), vocabulary 259; no files.
  * `SentencePieceTokenizer`: a SentencePiece ``.model`` file (the ``sentencepiece`` package).
  * `HFTokenizer`: a Hugging Face ``tokenizer.json`` (the ``tokenizers`` package).

``decode`` stops at eos and skips pad, bos and ids outside the vocabulary, for every tokenizer;
``encode`` adds no special tokens. `models.hf.load_tokenizer` picks a checkpoint directory's tokenizer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


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

    def __init__(self, model_file: str | os.PathLike):
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


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``) behind the interface of `ByteTokenizer`.

    bos/eos/pad come from ``tokenizer_config.json``'s special tokens, else config.json's
    ``*_token_id``, else the usual names (``<s>``, ``</s>``, ``<|begin_of_text|>``, ...);
    pad falls back to eos. encode adds no special tokens.
    """

    _BOS = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|startoftext|>")
    _EOS = ("</s>", "<|end_of_text|>", "<eos>", "[EOS]", "<|endoftext|>")
    _PAD = ("<pad>", "[PAD]", "<|pad|>")

    def __init__(self, tokenizer_file: str | os.PathLike, model_config: dict | None = None,
                 tokenizer_config: dict | None = None):
        import tokenizers  # Only needed for this tokenizer.

        try:
            self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises its own exception type
            raise ValueError(f"cannot load tokenizer {tokenizer_file}: {e}") from e
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        model_config, tokenizer_config = model_config or {}, tokenizer_config or {}
        ids = {role: self._find(role, names, model_config, tokenizer_config)
               for role, names in (("bos", self._BOS), ("eos", self._EOS), ("pad", self._PAD))}
        if ids["bos"] is None or ids["eos"] is None:
            raise ValueError(f"tokenizer {tokenizer_file} has no bos or eos token; declare them in "
                             "tokenizer_config.json or config.json (bos_token_id, eos_token_id).")
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = self.eos_id if ids["pad"] is None else ids["pad"]

    def _find(self, role: str, names: Sequence[str], model_config: dict, tokenizer_config: dict) -> int | None:
        token = tokenizer_config.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and self._tok.token_to_id(token) is not None:
            return self._tok.token_to_id(token)
        i = model_config.get(f"{role}_token_id")
        i = i[0] if isinstance(i, list) and i else i
        if isinstance(i, int) and 0 <= i < self.vocab_size:
            return i
        return next((self._tok.token_to_id(n) for n in names if self._tok.token_to_id(n) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Stops at eos, skips pad/bos and ids outside the vocabulary."""
        return self._tok.decode(content_ids(self, ids), skip_special_tokens=True)


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer
