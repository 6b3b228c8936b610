"""Logit-parity metrics between a reference and a candidate runner on the same windows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


ROWS = 64  # positions scored at once: 64 x vocab float64 temporaries (16 MB each at 32k vocab)


def _tensor(x: np.ndarray, device: str) -> torch.Tensor:
    """float64 on `device`: moved as stored (float32 across the bus), widened there."""
    x = np.ascontiguousarray(x)
    if not x.flags.writeable:  # torch.from_numpy shares memory and wants it writable
        x = x.copy()
    return torch.from_numpy(x).to(device).double()


@dataclass
class ParityAccumulator:
    """Accumulates per-position statistics window by window (memory: one window of logits).

    In float64 with torch on `device` (the reference's): one window is [ctx, vocab] (512 x 32000 =
    16M entries), and numpy's single-threaded exp/log over it took longer than the GPU's forward."""

    device: str = "cpu"
    kld: list[np.ndarray] = field(default_factory=list)
    nll_ref: float = 0.0
    nll_cand: float = 0.0
    n_pred: int = 0
    n_pos: int = 0
    top1_same: int = 0
    max_abs_dlogit: float = 0.0
    max_rel_err: float = 0.0
    nonfinite_positions: int = 0  # candidate positions with a NaN/Inf logit: a failure by itself

    @torch.no_grad()
    def add(self, ids: list[int], ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape:
            raise ValueError(f"logit shapes differ: reference {ref.shape}, candidate {cand.shape}")
        targets = np.asarray(ids[1:], dtype=np.int64)
        for p0 in range(0, len(ref), ROWS):  # small float64 temporaries, reused by the allocator
            self._add_rows(ref[p0 : p0 + ROWS], cand[p0 : p0 + ROWS], targets[p0 : p0 + ROWS])
        self.n_pred += len(targets)
        self.n_pos += len(ids)

    def _add_rows(self, ref: np.ndarray, cand: np.ndarray, targets: np.ndarray) -> None:
        """Positions ref/cand [rows, vocab]; targets: the next token of each that has one."""
        r, c = _tensor(ref, self.device), _tensor(cand, self.device)
        self.nonfinite_positions += int((~torch.isfinite(c)).any(dim=-1).sum())
        lr, lc = torch.log_softmax(r, -1), torch.log_softmax(c, -1)
        self.kld.append((lr.exp() * (lr - lc)).sum(-1).cpu().numpy())
        t = torch.from_numpy(targets).to(r.device)
        rows = torch.arange(len(t), device=r.device)
        self.nll_ref -= float(lr[rows, t].sum())
        self.nll_cand -= float(lc[rows, t].sum())
        self.top1_same += int((r.argmax(-1) == c.argmax(-1)).sum())
        diff = float((r - c).abs().max())  # NaN when the candidate has one
        # np.max propagates NaN, where the builtin max() would silently keep the old value
        self.max_abs_dlogit = float(np.max([self.max_abs_dlogit, diff]))
        self.max_rel_err = float(np.max([self.max_rel_err, diff / max(float(r.abs().max()), 1e-30)]))

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
