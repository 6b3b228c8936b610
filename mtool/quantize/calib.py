"""Calibration data: text or JSONL -> `nsamples` windows of `seqlen` tokens, seeded."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import load_text
from ..errors import MtoolError
from ..model.tokenizer import open_tokenizer


def calibration_ids(tok_dir: Path, calib: Path | None, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """[nsamples, seqlen] token ids: non-overlapping windows of the tokenized text, chosen with `seed`."""
    if nsamples < 1 or seqlen < 8:
        raise MtoolError("--nsamples must be >= 1 and --seqlen >= 8")
    text = load_text(calib)
    tok = open_tokenizer(tok_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n_windows = len(ids) // seqlen
    if n_windows < nsamples:
        where = calib or "the built-in calibration text"
        raise MtoolError(
            f"{where} gives {len(ids)} tokens: too short for {nsamples} x {seqlen} = {nsamples * seqlen}; "
            f"pass a longer --calib or lower --nsamples / --seqlen"
        )
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:nsamples]
    t = torch.tensor(ids[: n_windows * seqlen]).view(n_windows, seqlen)
    return t[order.sort().values]
