"""GPTQ (Frantar et al., 2022) for one linear layer, and round-to-nearest for comparison.

Written from the paper's algorithm (the reference implementations, AutoGPTQ and its
predecessors, are archived or embedded in other toolkits): H = 2 X X^T / n accumulated in
float32; dead input channels (zero diagonal) are fixed to H[d, d] = 1 and W[:, d] = 0;
damping lambda = damp * mean(diag(H)) with retry on Cholesky failure; columns processed in
blocks of 128 with lazy batch updates; optional act-order (columns by descending diag(H));
group-wise min/max quantization grids found when a group starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MtoolError


@dataclass
class QuantResult:
    """Integer codes and grids of one linear, in the packers' orientation."""

    codes: torch.Tensor  # [in, out] int64
    zeros: torch.Tensor  # [groups, out] int64 (true zero points)
    scales: torch.Tensor  # [groups, out] float32
    g_idx: torch.Tensor  # [in] int64
    dequant: torch.Tensor  # [out, in] float32: the weight the checkpoint represents


def grid(w: torch.Tensor, bits: int, sym: bool, *, min_zero: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of a min/max grid for w [rows, cols] (the GPTQ quantizer's)."""
    maxq = 2**bits - 1
    xmin = torch.minimum(w.min(dim=1).values, w.new_zeros(1))
    xmax = torch.maximum(w.max(dim=1).values, w.new_zeros(1))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(both_zero, -1.0, xmin), torch.where(both_zero, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        # GPTQ v1 stores zero - 1, so a zero point of 0 cannot be written: min_zero=1 keeps it representable
        zero = torch.round(-xmin / scale).clamp(min_zero, maxq)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale.unsqueeze(1)) + zero.unsqueeze(1), 0, 2**bits - 1)


def rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool, *, min_zero: int = 1) -> QuantResult:
    """Round-to-nearest with the same grids as GPTQ (the baseline GPTQ must beat)."""
    w = weight.float()
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    codes, zeros, scales = torch.empty_like(w), [], []
    for g0 in range(0, in_f, gs):
        s, z = grid(w[:, g0 : g0 + gs], bits, sym, min_zero=min_zero)
        codes[:, g0 : g0 + gs] = quantize_codes(w[:, g0 : g0 + gs], s, z, bits)
        scales.append(s)
        zeros.append(z)
    g_idx = torch.arange(in_f, device=w.device) // gs
    return _result(codes, torch.stack(zeros), torch.stack(scales), g_idx)


def _result(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> QuantResult:
    """Results on the CPU (where they are packed), whatever device the work ran on."""
    deq = (codes - zeros[g_idx].t()) * scales[g_idx].t()  # [out, in]
    return QuantResult(codes.t().to(torch.int64).contiguous().cpu(), zeros.to(torch.int64).cpu(), scales.cpu(),
                       g_idx.cpu(), deq.cpu())


class Hessian:
    """Running H = 2/n sum x x^T of a linear's inputs, in float32 (or float64 where asked).

    x^T x is symmetric, so only the block rows of its upper triangle are multiplied (a hand-made
    SYRK: torch exposes none) and mirrored: ~40 % fewer flops on the wide inputs where the
    products dominate GPTQ's time (down_proj's 3-4x hidden columns)."""

    BLOCK = 512

    def __init__(self, columns: int, device: str | torch.device = "cpu"):
        self.h = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        m = x.shape[0]
        self.h *= self.n / (self.n + m)
        self.n += m
        x = x * (2 / self.n) ** 0.5
        self.h += _gram(x, self.BLOCK)


def _gram(x: torch.Tensor, block: int) -> torch.Tensor:
    """x^T x from the upper triangle's block rows."""
    c = x.shape[1]
    if c <= 2 * block:
        return x.t() @ x
    g = torch.empty(c, c, dtype=x.dtype, device=x.device)
    for i in range(0, c, block):
        j = min(i + block, c)
        g[i:j, i:] = x[:, i:j].t() @ x[:, i:]
        g[j:, i:j] = g[i:j, j:].t()
    return g


def gptq(weight: torch.Tensor, hessian: Hessian, bits: int, group_size: int, sym: bool, *, desc_act: bool = False,
         damp: float = 0.01, block_size: int = 128, min_zero: int = 1) -> tuple[QuantResult, dict]:
    """Quantize weight [out, in] with GPTQ; returns the result and stats (damping used, error)."""
    W = weight.to(device=hessian.h.device, dtype=torch.float32).clone()
    H = hessian.h.clone()
    out_f, in_f = W.shape
    if hessian.n == 0:
        raise MtoolError("GPTQ got no calibration activations for a layer")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if desc_act else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, used = None, damp
    while used <= 1.0:  # x10 until it factorizes; damping of 1 x mean(diag) always does
        try:
            Hd = H + used * torch.mean(torch.diag(H)) * torch.eye(in_f, device=H.device)
            L = torch.linalg.cholesky(Hd)
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            if torch.isfinite(Hinv).all():
                break
            Hinv = None  # float32 rounding let a singular matrix through: damp more
        except torch.linalg.LinAlgError:
            pass
        used *= 10
    if Hinv is None:
        raise MtoolError("GPTQ: the Hessian could not be factorized even with damping 1.0 (non-finite activations?)")
    gs = in_f if group_size == -1 else group_size
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scales, zeros, gidx_perm = [], [], torch.zeros(in_f, dtype=torch.int64, device=W.device)
    loss = torch.zeros(out_f, device=W.device)
    s = z = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        # the column loop is the algorithm's sequential core: few, in-place ops per column (the
        # rank-1 update as one addr_), codes and loss gathered per block
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                # grid from the (already error-compensated) columns of this group
                group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, : gs] if col + gs > i2 else W1[:, i : i + gs]
                s, z = grid(group, bits, sym, min_zero=min_zero)
                scales.append(s)
                zeros.append(z)
            w = W1[:, i]
            q = quantize_codes(w.unsqueeze(1), s, z, bits).flatten()
            codes[:, col] = q
            deq = (q - z) * s
            Q[:, col] = deq
            gidx_perm[col] = len(scales) - 1
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        loss += Err1.pow(2).sum(dim=1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    codes, g_idx = codes[:, inv], gidx_perm[inv]
    res = _result(codes, torch.stack(zeros), torch.stack(scales), g_idx)
    return res, {"damp": used, "loss": float(loss.sum()), "dead": int(dead.sum())}
