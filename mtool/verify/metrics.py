"""Logit-parity metrics between a reference and a candidate runner on the same windows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class ParityAccumulator:
    """Accumulates per-position statistics window by window (memory: one window of logits)."""

    kld: list[np.ndarray] = field(default_factory=list)
    nll_ref: float = 0.0
    nll_cand: float = 0.0
    n_pred: int = 0
    n_pos: int = 0
    top1_same: int = 0
    max_abs_dlogit: float = 0.0
    max_rel_err: float = 0.0
    nonfinite_positions: int = 0  # candidate positions with a NaN/Inf logit: a failure by itself

    def add(self, ids: list[int], ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape:
            raise ValueError(f"logit shapes differ: reference {ref.shape}, candidate {cand.shape}")
        self.nonfinite_positions += int((~np.isfinite(cand)).any(axis=-1).sum())
        lr, lc = _log_softmax(ref), _log_softmax(cand)
        self.kld.append((np.exp(lr) * (lr - lc)).sum(axis=-1))
        targets = np.asarray(ids[1:])
        rows = np.arange(len(targets))
        self.nll_ref -= float(lr[rows, targets].sum())
        self.nll_cand -= float(lc[rows, targets].sum())
        self.n_pred += len(targets)
        self.n_pos += len(ids)
        self.top1_same += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        diff = np.abs(ref.astype(np.float64) - cand.astype(np.float64))
        # np.max propagates NaN, where the builtin max() would silently keep the old value
        self.max_abs_dlogit = float(np.max([self.max_abs_dlogit, diff.max()]))
        self.max_rel_err = float(np.max([self.max_rel_err, diff.max() / max(np.abs(ref).max(), 1e-30)]))

    def result(self) -> dict:
        kld = np.concatenate(self.kld)
        ppl_ref = float(np.exp(self.nll_ref / self.n_pred))
        ppl_cand = float(np.exp(self.nll_cand / self.n_pred))
        return {
            "positions": self.n_pos,
            "ppl_ref": ppl_ref,
            "ppl_cand": ppl_cand,
            "ppl_ratio": ppl_cand / ppl_ref,
            "kld_mean": float(kld.mean()),
            "kld_p99": float(np.percentile(kld, 99)),
            "kld_max": float(kld.max()),
            "top1_agreement": self.top1_same / self.n_pos,
            "max_abs_dlogit": self.max_abs_dlogit,
            "max_rel_err": self.max_rel_err,
            "nonfinite_positions": self.nonfinite_positions,
        }


def json_safe(value):
    """NaN/Inf -> None recursively, so a report is valid JSON (json.dumps would write NaN)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
