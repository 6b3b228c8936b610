"""The reference's logits over the verify windows, computed once and kept on disk.

A release verifies every artifact on the same windows; running the reference model once per
artifact would cost as many full forward passes (minutes to hours for the seed models). The
logits (float32, exactly what the reference run yields) go to one .npy file, written atomically
and memory-mapped when read back, so that memory stays at one window's logits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..outputs import fsync_path, write_report
from .report import Reference


class CachedReference:
    """Logits of `reference`'s windows stored at `path` (.npy) with a sidecar .json."""

    def __init__(self, reference: Reference, path: Path):
        self.reference, self.path = reference, Path(path)
        self.meta_path = self.path.with_suffix(".json")
        self.runs = 0  # how many times the reference model ran through this cache

    @property
    def ready(self) -> bool:
        if not (self.path.is_file() and self.meta_path.is_file()):
            return False
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return False
        return meta.get("lengths") == [len(w) for w in self.reference.windows] and meta.get("complete") is True

    def compute(self, on_layer: Callable[[int], None] | None = None) -> None:
        """Run the reference once and store its logits (atomically: a .tmp file renamed)."""
        r = self.reference
        total = sum(len(w) for w in r.windows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, r.model.vocab_size))
        at = 0
        self.runs += 1
        for w, logits in zip(r.windows, r.iter_logits(on_layer=on_layer)):
            if logits.shape != (len(w), r.model.vocab_size):
                raise ValueError(f"reference logits of shape {logits.shape} for a window of {len(w)} tokens")
            arr[at : at + len(w)] = logits
            at += len(w)
        arr.flush()
        del arr
        fsync_path(tmp)
        os.replace(tmp, self.path)
        meta = {"lengths": [len(w) for w in r.windows], "label": r.label, "complete": True}
        write_report(self.meta_path, json.dumps(meta))

    def iter_logits(self, on_layer: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
        """The stored logits, one window at a time (computed first if not stored yet)."""
        if not self.ready:
            self.compute(on_layer)
        self.reference.label = json.loads(self.meta_path.read_text())["label"] + ", cached"
        arr = np.load(self.path, mmap_mode="r")
        at = 0
        for w in self.reference.windows:
            yield np.array(arr[at : at + len(w)])
            at += len(w)
