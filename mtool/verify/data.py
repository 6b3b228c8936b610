"""Evaluation text cut into token windows."""

from __future__ import annotations

from ..errors import MtoolError


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
