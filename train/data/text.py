"""Text corpora: UTF-8 text files split into documents and chunks, JSONL records, and the Python
standard library's ``.py`` files on this machine (a stable hash of the relative path puts ~5% in 'eval')."""
from __future__ import annotations

import json
import os
import re
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Sequence

from train.data.records import Record, stable_hash


def read_text(path: str | os.PathLike) -> str:
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
        docs.extend(d.strip("\n") for d in re.split(r"\n(?:[ \t\r\f\v]*\n)+", read_text(path)) if d.strip())
    return docs


def jsonl_objects(paths: Sequence[str]) -> Iterator[tuple[Any, str]]:
    """(JSON value, "FILE, line N") of every non-blank line of the JSONL ``paths``, in order; a malformed line
    raises ValueError naming its file and line (1-based)."""
    for path in paths:
        for lineno, line in enumerate(read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno}).") from None
            yield obj, where


def read_jsonl_records(paths: Sequence[str]) -> list[Record]:
    """(prompt, completion) pairs from JSONL files: `text` gives ('', text).

    Blank lines are skipped; any other malformed line raises ValueError naming file and line (1-based).
    """
    records = []
    for obj, where in jsonl_objects(paths):
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
    return "eval" if stable_hash(relative_path) % 100 < STDLIB_EVAL_PERCENT else "train"


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
