"""Merge methods on one tensor at a time (fp32 in, fp32 out).

The formulas follow the published methods as mergekit implements them: linear (weighted
average), SLERP (Shoemake; falls back to lerp for nearly parallel tensors), task arithmetic
(Ilharco et al.), TIES (Yadav et al.: trim by magnitude, elect sign, disjoint mean) and DARE
(Yu et al.: drop at random with p = 1 - density, rescale by 1 / density). Written here because
mergekit is a whole application (its own loader, writer and pins), not a library of these
few lines.
"""

from __future__ import annotations

import torch

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
NEEDS_BASE = {"task_arithmetic", "ties", "dare_linear", "dare_ties"}


def linear(xs: list[torch.Tensor], w: list[float], normalize: bool) -> torch.Tensor:
    # x0 + sum w_i (x_i - x0) / W: equal to sum w_i x_i / W, and exact when all inputs agree
    total = sum(w) if normalize else 1.0
    scale = sum(w) / total
    out = xs[0] * scale if scale != 1.0 else xs[0].clone()
    for x, wi in zip(xs, w):
        if wi:
            out += (wi / total) * (x - xs[0])
    return out


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8, dot_threshold: float = 0.9995) -> torch.Tensor:
    if t == 0.0:
        return a.clone()
    if t == 1.0:
        return b.clone()
    fa, fb = a.flatten().double(), b.flatten().double()
    na, nb = fa / (fa.norm() + eps), fb / (fb.norm() + eps)
    dot = float((na * nb).sum().clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:
        return ((1 - t) * a.double() + t * b.double()).to(a.dtype)
    omega = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    so = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / so) * a.double() + (torch.sin(t * omega) / so) * b.double()
    return out.to(a.dtype)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` fraction of entries with the largest magnitude."""
    if density >= 1.0:
        return delta
    k = int(round(density * delta.numel()))
    if k <= 0:
        return torch.zeros_like(delta)
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return delta * (delta.abs() >= threshold)


def _dare(delta: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=gen) < density
    return delta * keep / density


def _ties_combine(deltas: list[torch.Tensor], w: list[float], normalize: bool) -> torch.Tensor:
    weighted = torch.stack([wi * d for wi, d in zip(w, deltas)])
    sign = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(weighted) == sign) & (weighted != 0)
    merged = (weighted * agree).sum(dim=0)
    if normalize:
        denom = (torch.tensor(w, dtype=torch.float32).view(-1, *[1] * deltas[0].ndim) * agree).sum(dim=0)
        merged = merged / denom.clamp(min=1e-12)
    return merged


def merge_tensor(method: str, xs: list[torch.Tensor], base: torch.Tensor | None, w: list[float], *,
                 normalize: bool, t: float, density: float, lam: float, gen: torch.Generator) -> torch.Tensor:
    """Merge one tensor of every source (fp32); `base` for the task-vector methods."""
    if method == "linear":
        return linear(xs, w, normalize)
    if method == "slerp":
        return slerp(xs[0], xs[1], t)
    assert base is not None
    deltas = [x - base for x in xs]
    if method == "task_arithmetic":
        return base + lam * linear([torch.zeros_like(base)] + deltas, [0.0] + w, normalize=False)
    if method == "ties":
        return base + lam * _ties_combine([_trim(d, density) for d in deltas], w, normalize)
    if method == "dare_linear":
        dropped = [_dare(d, density, gen) for d in deltas]
        return base + lam * linear([torch.zeros_like(base)] + dropped, [0.0] + w, normalize=False) / (sum(w) if normalize else 1.0)
    if method == "dare_ties":
        return base + lam * _ties_combine([_dare(d, density, gen) for d in deltas], w, normalize)
    raise ValueError(method)
