"""Chunked whole-tensor checks, so checking a tensor never costs a second copy of it."""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

# Work is done in chunks of about this many elements, so float32 temporaries stay a few MB
# whatever the tensor size (the embedding of a 150k vocab is 1 GB+; isfinite() on bf16
# alone upcasts the whole tensor).
CHUNK_ELEMENTS = 1 << 20

F16_MAX = 65504.0


def scan_values(t: torch.Tensor) -> tuple[bool, float]:
    """(all finite, max |value|) in one pass (aminmax propagates NaN), chunk by chunk."""
    amax = 0.0
    for chunk in t.reshape(-1).split(CHUNK_ELEMENTS):
        lo, hi = torch.aminmax(chunk)
        lo, hi = float(lo), float(hi)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return False, float("inf")
        amax = max(amax, -lo, hi)
    return True, amax


def check_finite(t: torch.Tensor, name: str) -> float:
    """max |value| of a float tensor; InputError naming it when any value is NaN or Inf."""
    finite, amax = scan_values(t)
    if not finite:
        raise InputError(f"tensor {name} contains NaN or Inf values")
    return amax
