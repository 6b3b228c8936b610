"""GPTQ (Frantar et al., 2022) for one linear layer, and round-to-nearest for comparison.

Written from the paper's algorithm (the reference implementations, AutoGPTQ and its
predecessors, are archived or embedded in other toolkits): H = 2 X X^T / n accumulated in
float32; dead input channels (zero diagonal) are fixed to H[d, d] = 1 and W[:, d] = 0;
damping lambda = damp * mean(diag(H)) with retry on Cholesky failure; columns processed in
blocks of 128 with lazy batch updates; optional act-order (columns by descending diag(H));
group-wise min/max quantization grids found when a group starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import MtoolError


@dataclass
class QuantResult:
    """Integer codes and grids of one linear, in the packers' orientation."""

    codes: torch.Tensor  # [in, out] uint8, on the CPU
    zeros: torch.Tensor  # [groups, out] int64 (true zero points)
    scales: torch.Tensor  # [groups, out] float32
    g_idx: torch.Tensor  # [in] int64
    dequant: torch.Tensor | None  # [out, in] float32 where the work ran: the weight the checkpoint represents
    # (None once it is back in the layer: the engine keeps codes and grids only)


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
    """Codes and grids on the CPU, where they are packed: codes as bytes (< 2^bits <= 256), an eighth
    of int64's transfer and memory (a real-size Mixtral layer's codes are 1.4 GB so, 11 GB as int64).
    The dequantized weight stays where the work ran: it goes back into the layer there."""
    deq = (codes - zeros[g_idx].t()) * scales[g_idx].t()  # [out, in]
    return QuantResult(codes.t().to(torch.uint8).contiguous().cpu(), zeros.to(torch.int64).cpu(), scales.cpu(),
                       g_idx.cpu(), deq)


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
    maxq = 2**bits - 1
    Q = torch.zeros_like(W)
    scales, zeros = [], []
    loss = torch.zeros(out_f, device=W.device)
    s = z = None
    graphs = _BlockGraphs.get(W.device, out_f, maxq) if gs % block_size == 0 else None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        # the block in column-major form: column i is row i, contiguous (the loop reads and writes one
        # column at a time; coalesced on a GPU, cache lines on a CPU)
        W1t = W[:, i1:i2].t().contiguous()
        Hinv1 = Hinv[i1:i2, i1:i2]
        if gs % block_size == 0:
            # groups span whole blocks: a grid starts at most at the block's first column, from the
            # (already error-compensated) columns of its group
            if i1 % gs == 0:
                s, z = grid(W[:, i1 : i1 + gs], bits, sym, min_zero=min_zero)
                scales.append(s)
                zeros.append(z)
            graph = graphs.graph(i2 - i1) if graphs is not None else None
            if graph is not None:
                Qt, Et = graph.run(W1t, Hinv1, s, z)  # the graph's own output buffers
            else:
                Qt, Et = torch.empty_like(W1t), torch.empty_like(W1t)
                _columns(W1t, Hinv1, Qt, Et, s, z, maxq, 0, i2 - i1)
        else:
            Qt, Et = torch.empty_like(W1t), torch.empty_like(W1t)
            # segments of the block between the columns where a group starts
            cuts = sorted({0, i2 - i1} | {c - i1 for c in range(i1, i2) if c % gs == 0})
            for a, b in zip(cuts, cuts[1:]):
                if (i1 + a) % gs == 0:
                    s, z = grid(_group(W1t, W, Et, Hinv, i1, a, gs), bits, sym, min_zero=min_zero)
                    scales.append(s)
                    zeros.append(z)
                _columns(W1t, Hinv1, Qt, Et, s, z, maxq, a, b)
        Q[:, i1:i2] = Qt.t()
        loss += Et.pow(2).sum(dim=0) / 2
        W[:, i2:] -= Et.t() @ Hinv[i1:i2, i2:]
    # codes from the dequantized values: q = (deq / s) + z is exact, deq being (q - z) * s with q an
    # integer below 2^bits
    gidx_perm = torch.arange(in_f, device=W.device) // gs
    S, Z = torch.stack(scales), torch.stack(zeros)
    codes = torch.round(Q / S[gidx_perm].t()) + Z[gidx_perm].t()
    inv = torch.argsort(perm)
    codes, g_idx = codes[:, inv], gidx_perm[inv]
    res = _result(codes, Z, S, g_idx)
    return res, {"damp": used, "loss": float(loss.sum()), "dead": int(dead.sum())}


def gptq_stacked(weights: list[torch.Tensor], hessian: Hessian, bits: int, group_size: int, sym: bool,
                 **kw) -> list[QuantResult]:
    """GPTQ of linears that read the same input (one Hessian) as one solve. Given H, GPTQ treats each
    row on its own (its grid, its error feedback), so the rows of q/k/v, of gate/up or of the experts'
    w1/w3 stacked give each linear its own result, with one factorization and one column loop for all
    (the loop's per-op overhead is paid once instead of once per linear)."""
    if len(weights) == 1:
        return [gptq(weights[0], hessian, bits, group_size, sym, **kw)[0]]
    res, _ = gptq(torch.cat(weights), hessian, bits, group_size, sym, **kw)
    out, r0 = [], 0
    for w in weights:
        r1 = r0 + w.shape[0]
        out.append(QuantResult(res.codes[:, r0:r1].contiguous(), res.zeros[:, r0:r1].contiguous(),
                               res.scales[:, r0:r1].contiguous(), res.g_idx, res.dequant[r0:r1]))
        r0 = r1
    return out


def _group(W1t: torch.Tensor, W: torch.Tensor, Et: torch.Tensor, Hinv: torch.Tensor, i1: int, a: int,
           gs: int) -> torch.Tensor:
    """The columns [out, gs] of the group starting at column a of the block at i1, as the paper's
    column-at-a-time algorithm sees them: where the group runs past the block, its tail gets the
    block's pending (lazy) update from the columns already done."""
    width = W1t.shape[0]
    if a + gs <= width:
        return W1t[a : a + gs].t()
    i2, end = i1 + width, min(i1 + a + gs, W.shape[1])
    tail = W[:, i2:end] - Et[:a].t() @ Hinv[i1 : i1 + a, i2:end]
    return torch.cat([W1t[a:].t(), tail], dim=1)


def _columns(W1t: torch.Tensor, Hinv1: torch.Tensor, Qt: torch.Tensor, Et: torch.Tensor, s: torch.Tensor,
             z: torch.Tensor, maxq: int, c0: int, c1: int) -> None:
    """GPTQ's sequential core over block columns c0..c1, in place: quantize column i on grid (s, z),
    write its dequantized value to Qt[i] and its scaled error to Et[i], and spread the error over the
    block's later columns. Every op writes into given storage (no allocation), so the loop can be
    captured in a CUDA graph; nine kernels a column."""
    for i in range(c0, c1):
        w, q, e = W1t[i], Qt[i], Et[i]
        torch.div(w, s, out=q)
        q.round_().add_(z).clamp_(0, maxq)
        q.sub_(z).mul_(s)  # the dequantized column
        torch.sub(w, q, out=e).div_(Hinv1[i, i])
        W1t[i:].addr_(Hinv1[i, i:], e, alpha=-1)


class _BlockGraphs:
    """CUDA graphs of `_columns` over whole blocks, one per (device, rows, block width, maxq), captured
    on first use and replayed: the column loop is ~1,000 tiny kernels a block, launch-bound on a GPU
    when each is launched from Python. Kept for the process (static buffers of 3 x block x rows floats
    each: a few hundred MB at most for the shapes of one model). MTOOL_CUDA_GRAPHS=0 launches op by op."""

    _cache: dict = {}

    def __init__(self, device: torch.device, rows: int, maxq: int):
        self.device, self.rows, self.maxq = device, rows, maxq
        self.by_width: dict[int, object] = {}

    @classmethod
    def get(cls, device: torch.device, rows: int, maxq: int) -> _BlockGraphs | None:
        if device.type != "cuda" or os.environ.get("MTOOL_CUDA_GRAPHS", "1") == "0":
            return None
        key = (str(device), rows, maxq)
        if key not in cls._cache:
            cls._cache[key] = cls(device, rows, maxq)
        return cls._cache[key]

    def graph(self, width: int) -> _Graph | None:
        if width not in self.by_width:
            try:
                self.by_width[width] = _Graph(self.device, self.rows, width, self.maxq)
            except RuntimeError:  # capture unsupported here: launch op by op
                self.by_width[width] = None
        return self.by_width[width]


class _Graph:
    """One captured block: static inputs (block, its inverse-Hessian slice, grid) and outputs."""

    def __init__(self, device: torch.device, rows: int, width: int, maxq: int):
        f32 = dict(dtype=torch.float32, device=device)
        self.W, self.Q, self.E = (torch.zeros(width, rows, **f32) for _ in range(3))
        self.H = torch.eye(width, **f32)
        self.s, self.z = torch.ones(rows, **f32), torch.zeros(rows, **f32)
        args = (self.W, self.H, self.Q, self.E, self.s, self.z, maxq, 0, width)
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture, as torch's CUDA-graph notes ask
                _columns(*args)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                _columns(*args)

    def run(self, W1t: torch.Tensor, Hinv1: torch.Tensor, s: torch.Tensor, z: torch.Tensor):
        self.W.copy_(W1t)
        self.H.copy_(Hinv1)
        self.s.copy_(s)
        self.z.copy_(z)
        self.graph.replay()
        return self.Q, self.E
