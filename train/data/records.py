"""What every source builds on: examples before tokenization and the stable hash that seeds them.

A Record is one example, (prompt, completion); plain text has an empty prompt. A PairRecord is
one preference pair, (prompt, chosen completion, rejected completion).
"""
from __future__ import annotations

import hashlib

Record = tuple[str, str]
PairRecord = tuple[str, str, str]


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
