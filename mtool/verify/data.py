"""Evaluation text cut into token windows."""

from __future__ import annotations

from collections.abc import Callable

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


# tokens tokenized beyond what the windows need: a prefix cut inside a word tokenizes differently
# only at its end, so these last tokens absorb the cut
PREFIX_MARGIN = 64


def enough_text(text: str, encode: Callable[[str], list[int]], tokens: int) -> tuple[str, list[int]]:
    """The shortest prefix of `text` (cut at a line break or space; tried at doubling lengths) that
    gives `tokens` tokens plus a margin, and its tokens; `text` itself and its tokens when no shorter
    prefix does. Tokenizers work word by word, so the tokens before the cut are the whole text's.
    Tokenizing a whole corpus (with llama.cpp's tokenizer too) to score a few windows took minutes on
    a large --data file."""
    chars = max(4096, tokens * 4)
    while chars < len(text):
        cut = text.rfind("\n", 0, chars)
        if cut < chars // 2:
            cut = text.rfind(" ", 0, chars)
        if cut < chars // 2:
            cut = chars
        prefix = text[:cut]
        ids = encode(prefix)
        if len(ids) >= tokens + PREFIX_MARGIN:
            return prefix, ids
        chars *= 2
    return text, encode(text)
