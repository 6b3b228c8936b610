"""Evaluation text: the built-in bilingual sample or a user file, cut into token windows."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import MtoolError


def builtin_text() -> str:
    """A small English/Chinese sample shipped with mtool (also the tiny models' corpus)."""
    return resources.files("mtool.data").joinpath("bilingual.txt").read_text(encoding="utf-8")


def load_text(path: str | Path | None) -> str:
    """Text of --data (plain text, or JSONL with a 'text' field), or the built-in sample."""
    if path is None:
        return builtin_text()
    p = Path(path)
    if not p.is_file():
        raise MtoolError(f"data file {p} not found")
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        import json

        try:
            raw = "\n".join(json.loads(line)["text"] for line in raw.splitlines() if line.strip())
        except (json.JSONDecodeError, KeyError) as e:
            raise MtoolError(f"{p}: every JSONL line needs a 'text' field ({e})") from None
    if not raw.strip():
        raise MtoolError(f"data file {p} is empty")
    return raw


def token_windows(ids: list[int], ctx: int, max_windows: int, bos_id: int | None) -> list[list[int]]:
    """Consecutive windows of `ctx` tokens; each starts with BOS when the tokenizer adds one."""
    body = ids[1:] if bos_id is not None and ids and ids[0] == bos_id else ids
    step = ctx - 1 if bos_id is not None else ctx
    windows = []
    for start in range(0, len(body), step):
        chunk = body[start : start + step]
        if len(chunk) < min(step, 16):
            break
        windows.append(([bos_id] if bos_id is not None else []) + chunk)
        if len(windows) == max_windows:
            break
    if not windows:
        raise MtoolError(f"evaluation text gives only {len(ids)} tokens; need at least 17")
    return windows
