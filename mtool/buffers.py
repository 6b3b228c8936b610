"""Reused numpy buffers: fresh memory costs the kernel a page fault and a page of zeros per 4 KB, which
on the 2-core VM was a third of a real-size MoE f16 conversion (perf: clear_page_erms under the
converter), so the big per-tensor arrays of the GGUF paths are recycled rather than allocated."""

from __future__ import annotations

import threading

import numpy as np


class Recycler:
    """Byte buffers handed back once used (written out, or encoded from), reused for the next tensors.
    At most `keep` free buffers are kept; only buffers made here are taken back."""

    def __init__(self, keep: int):
        self._keep = keep
        self._free: list[np.ndarray] = []
        self._made: set[int] = set()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        with self._lock:  # the free list is sorted by size: the first that fits is the smallest
            k = next((k for k, b in enumerate(self._free) if b.size >= nbytes), None)
            if k is not None:
                return self._free.pop(k)[:nbytes]
        buf = np.empty(nbytes, dtype=np.uint8)
        with self._lock:
            self._made.add(id(buf))
        return buf

    def give(self, arr: np.ndarray) -> None:
        root = arr
        while isinstance(root.base, np.ndarray):
            root = root.base
        with self._lock:
            if id(root) in self._made:
                self._free.append(root)
                self._free.sort(key=lambda b: b.size)
                while len(self._free) > self._keep:  # the smallest go: big ones save the most
                    self._made.discard(id(self._free.pop(0)))


_local = threading.local()


def scratch(shape: tuple[int, ...], dtype, slot: str = "work") -> np.ndarray:
    """A per-thread scratch array of `shape` (contents undefined), grown as needed and kept: for
    temporaries that each call overwrites before reading (at most one live per thread and `slot`;
    callers that nest use different slots)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < n:
        buf = bufs[slot] = np.empty(n, dtype=np.uint8)
    return buf[:n].view(dtype).reshape(shape)
