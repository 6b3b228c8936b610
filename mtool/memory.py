"""Process-wide memory settings for streaming work."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_MMAP_THRESHOLD = -3


def return_freed_memory_promptly(threshold: int = 16 << 20) -> bool:
    """Fix glibc's mmap threshold so big tensors are mmapped and returned to the OS on free.

    glibc raises its mmap threshold dynamically (up to 32 MiB) after the first large free;
    from then on multi-MB tensors come from the heap, and freed heap stays in the process:
    streaming one tensor after another then ratchets RSS upwards. A fixed 16 MiB threshold
    keeps the small, reused temporaries of quantization on the fast heap (1 MiB made q8_0
    2-3x slower through page faults) while large tensors leave when freed (measured on a
    0.5B model: f16 peak RSS 512 -> ~420 MB). Returns False where it does not apply.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
