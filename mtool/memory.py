"""Process-wide memory settings for streaming work."""

from __future__ import annotations

import ctypes
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
    try:  # the process's own symbols include libc's (find_library would run ldconfig in a subprocess)
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def available_bytes(device: str = "cpu") -> int:
    """Memory that can still be allocated without swapping: MemAvailable of /proc/meminfo (Linux;
    elsewhere 4 GiB is assumed), or the free memory of the CUDA device."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30
