"""Importance matrices from the HF model in torch, one decoder layer at a time.

What llama-imatrix collects, computed on transformers' own layers: for every weight matrix of
a block, the sum over calibration tokens of the squared input of each column, and the number
of tokens. q/k/v (and gate/up) read the same input, so each shares one sum. MoE experts count
only the tokens the router sends them (top-k, as llama.cpp's MUL_MAT_ID sees them), per expert,
so starved experts are visible; the router itself sees every token. Names are the GGUF tensor
names, so the file feeds llama-quantize as well as mtool. output.weight is left out, as
llama-imatrix does without --process-output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..convert.gguf_export import gguf_name
from ..convert.imatrix_file import ImportanceMatrix, write_imatrix
from ..errors import InputError, UsageError
from ..model import experts
from ..model.canonical import CanonicalModel
from ..outputs import check_output_path, commit_files, output_transaction
from .calib import calibration_ids
from .engine import LayerRunner, QuantSettings, expert_mid


@dataclass
class ImatrixLayerReport:
    index: int
    seconds: float
    expert_tokens: list[int] | None = None  # MoE: tokens routed to each expert


class _Accumulator:
    """Per GGUF name: sums [n_mat, n_per_row] (float64, on the layer's device) and counts."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, np.ndarray] = {}

    def add(self, name: str, x: torch.Tensor, mat: int = 0, n_mat: int = 1) -> None:
        x = x.reshape(-1, x.shape[-1])
        if name not in self.sums:
            self.sums[name] = torch.zeros(n_mat, x.shape[-1], dtype=torch.float64, device=x.device)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        self.sums[name][mat] += x.to(torch.float64).pow(2).sum(0)
        self.counts[name][mat] += x.shape[0]

    def share(self, src: str, *dst: str) -> None:
        for d in dst:
            self.sums[d], self.counts[d] = self.sums[src], self.counts[src]


def compute_imatrix(model: CanonicalModel, ids: torch.Tensor, *, device: str = "cpu", dataset: str = "",
                    on_layer: Callable[[ImatrixLayerReport], None] | None = None) -> ImportanceMatrix:
    """Importance matrix of `model` over calibration windows `ids` [n, seqlen]."""
    runner = LayerRunner(model, ids, QuantSettings("none", device=device))
    moe = model.moe
    acc = _Accumulator()
    x = runner.x
    for i in range(model.n_layers):
        t0 = time.perf_counter()
        layer = runner.layer(i)
        prefix = f"model.layers.{i}."
        names = {m: [gguf_name(model, f"{prefix}{n}.weight") for n in lins]
                 for m, lins in model.spec.shared_inputs().items()}
        mods = dict(layer.named_modules())
        routed: list[int] | None = None  # summed over the forward's batches

        def linear_hook(module, args, m):
            first, *rest = names[m]
            acc.add(first, args[0])
            acc.share(first, *rest)

        def moe_hook(module, args, layer=layer):
            nonlocal routed
            batch = _moe_statistics(runner, layer, args[0], i, acc)
            routed = batch if routed is None else [a + b for a, b in zip(routed, batch)]

        hooks = [mods[m].register_forward_pre_hook(lambda mod, args, m=m: linear_hook(mod, args, m)) for m in names]
        if moe:
            hooks.append(layer.mlp.register_forward_pre_hook(moe_hook))
        try:
            x = runner.forward(layer, x)
        finally:
            for h in hooks:
                h.remove()
        if not torch.isfinite(x).all():
            raise InputError(f"layer {i} of {model.source} produces NaN/Inf on the calibration text")
        del layer
        if on_layer:
            on_layer(ImatrixLayerReport(i, time.perf_counter() - t0, routed))
    sums = {n: s.to(torch.float32).cpu().numpy() for n, s in acc.sums.items()}
    for n, s in sums.items():
        if not np.isfinite(s).all():
            raise InputError(f"importance sums of {n} overflow float32 (activations too large)")
    return ImportanceMatrix(sums, dict(acc.counts), [dataset or "built-in"], int(ids.shape[0]), int(ids.shape[1]))


@torch.no_grad()
def _moe_statistics(runner: LayerRunner, layer, hidden: torch.Tensor, i: int, acc: _Accumulator) -> list[int]:
    """Router: every token; each expert's w1/w3 (gate/up) and w2 (down): its routed tokens."""
    cfg = runner.config
    xs = hidden.reshape(-1, hidden.shape[-1])
    n_exp = runner.model.n_experts
    acc.add(gguf_name(runner.model, f"model.layers.{i}.{experts.ROUTER}.weight"), xs)
    _, _, chosen = layer.mlp.gate(xs)  # transformers' own router: [tokens, top_k] expert ids
    gate, up, down = experts.gguf_stack(i, "w1"), experts.gguf_stack(i, "w3"), experts.gguf_stack(i, "w2")
    routed = []
    for e in range(n_exp):
        tok = xs[(chosen == e).any(-1)]
        routed.append(int(tok.shape[0]))
        if not tok.shape[0]:  # still an entry, with a zero count, so a starved expert is visible
            for n, width in ((gate, xs.shape[-1]), (up, xs.shape[-1]), (down, cfg.intermediate_size)):
                acc.add(n, torch.zeros(0, width, device=xs.device), e, n_exp)
            continue
        acc.add(gate, tok, e, n_exp)
        acc.add(up, tok, e, n_exp)
        acc.add(down, expert_mid(layer, tok, e, cfg.intermediate_size), e, n_exp)
    return routed


@dataclass
class ImatrixReport:
    out: Path
    imatrix: ImportanceMatrix
    layers: list[ImatrixLayerReport]
    tokens: int
    seconds: float
    device: str


def make_imatrix(model: CanonicalModel, out: Path, *, calib: Path | None = None, nsamples: int = 16,
                 seqlen: int = 128, seed: int = 0, device: str = "cpu", force: bool = False,
                 on_layer: Callable[[ImatrixLayerReport], None] | None = None,
                 dataset: str | None = None) -> ImatrixReport:
    """Compute the importance matrix of `model` on calibration text and write it (GGUF) to `out`.
    `dataset`: the name recorded in `imatrix.datasets` (default: the calibration file as given)."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise UsageError(f"importance matrix output {out} must end in .gguf (llama.cpp's GGUF imatrix format)")
    inputs = [model.source, model.tokenizer_dir] + ([Path(calib)] if calib else [])
    check_output_path(out, force=force, sources=inputs)
    ids = calibration_ids(model.tokenizer_dir, calib, nsamples, seqlen, seed)
    t0 = time.perf_counter()
    layers: list[ImatrixLayerReport] = []

    def record(rep: ImatrixLayerReport) -> None:
        layers.append(rep)
        if on_layer:
            on_layer(rep)

    im = compute_imatrix(model, ids, device=device, dataset=dataset or (str(calib) if calib else "built-in"),
                         on_layer=record)
    seconds = time.perf_counter() - t0
    needed = sum(s.nbytes + 8 * len(s) + 256 for s in im.sums.values()) + 4096
    with output_transaction(out, force=force, sources=inputs, needed_bytes=needed) as tx:
        write_imatrix(tx.dir / out.name, im)
        commit_files([tx.dir / out.name], out.parent, replace=[out] if force else [])
    im.path = out
    return ImatrixReport(out, im, layers, int(ids.numel()), seconds, device)
