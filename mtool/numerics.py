"""Chunked whole-tensor checks, so checking a tensor never costs a second copy of it."""

from __future__ import annotations

import numpy as np

from .buffers import scratch
from .dtypes import DType
from .errors import InputError

# Work is done in chunks of about this many elements, so float32 temporaries stay a few MB
# whatever the tensor size (the embedding of a 150k vocab is 1 GB+; isfinite() on bf16
# alone upcasts the whole tensor).
CHUNK_ELEMENTS = 1 << 20

F16_MAX = 65504.0

# IEEE layouts: (unsigned int type of the same width, mask of all bits but the sign, abs bits of +Inf)
_BITS = {"float32": (np.uint32, 0x7FFFFFFF, 0x7F800000), "float16": (np.uint16, 0x7FFF, 0x7C00),
         "bfloat16": (np.uint16, 0x7FFF, 0x7F80)}


def scan_values(t) -> tuple[bool, float]:
    """(all finite, max |value|) of a float torch tensor in one pass (aminmax propagates NaN), chunk by chunk."""
    import torch

    amax = 0.0
    for chunk in t.reshape(-1).split(CHUNK_ELEMENTS):
        lo, hi = torch.aminmax(chunk)
        lo, hi = float(lo), float(hi)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            return False, float("inf")
        amax = max(amax, -lo, hi)
    return True, amax


def scan_storage(a: np.ndarray, dtype: DType) -> tuple[bool, float]:
    """`scan_values` for numpy storage of an f32/f16/bf16 tensor, on the bits: with the sign
    masked off, IEEE floats order like unsigned integers and every pattern from +Inf's up is
    Inf or NaN, so one integer max per chunk answers both questions."""
    uint, mask, inf = _BITS[dtype.name]
    flat = a.reshape(-1).view(uint)
    top = 0
    # kept per thread: a fresh array per tensor was freed back to the allocator and faulted in
    # again each time (perf: two thirds of `mtool quantize`'s page faults)
    tmp = scratch((min(CHUNK_ELEMENTS, flat.size),), uint, slot="scan")
    for i in range(0, flat.size, CHUNK_ELEMENTS):
        part = flat[i : i + CHUNK_ELEMENTS]
        top = max(top, int(np.bitwise_and(part, mask, out=tmp[: part.size]).max()))
    if top >= inf:
        return False, float("inf")
    value = np.array([top], dtype=uint)
    if dtype.name == "bfloat16":
        return True, float((value.astype(np.uint32) << 16).view(np.float32)[0])
    return True, float(value.view(np.float32 if uint is np.uint32 else np.float16)[0])


def check_finite(t, name: str, dtype: DType | None = None) -> float:
    """max |value| of a float tensor (torch, or numpy storage of `dtype`); InputError naming it
    when any value is NaN or Inf."""
    finite, amax = scan_values(t) if dtype is None else scan_storage(t, dtype)
    if not finite:
        raise InputError(f"tensor {name} contains NaN or Inf values")
    return amax
