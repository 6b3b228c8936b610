"""Text mtool ships and reads: the built-in bilingual sample and user text files (--data, --calib)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import InputError


def builtin_text() -> str:
    """A small English/Chinese sample shipped with mtool (also the tiny models' corpus)."""
    return resources.files("mtool.data").joinpath("bilingual.txt").read_text(encoding="utf-8")


def load_text(path: str | Path | None) -> str:
    """Text of --data (plain text, or JSONL with a 'text' field), or the built-in sample."""
    if path is None:
        return builtin_text()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"data file {p} not found")
    data = p.read_bytes()
    if b"\x00" in data:
        raise InputError(f"data file {p} is binary, not text")
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"data file {p} is not UTF-8 text (byte {e.start})") from None
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{p} line {n} is not JSON: {e.msg}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise InputError(f"{p} line {n} needs a string 'text' field")
            texts.append(rec["text"])
        raw = "\n".join(texts)
    if not raw.strip():
        raise InputError(f"data file {p} is empty")
    return raw
