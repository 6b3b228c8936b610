"""`mtool convert --to gptq|awq`: calibrated quantization written in the standard checkpoint layouts.

The output tensor list (names, shapes, dtypes) is planned from the config before any work,
so bad bit/group combinations fail at once and the streaming writer can lay out its shards.
The layer-by-layer engine then produces tensors in file order: the first tensor of layer i
triggers quantization of layer i, and only that layer's results are held.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..convert.hf_export import hf_config
from ..errors import MtoolError
from ..model import experts
from ..model.canonical import CanonicalModel, LazyTensor
from ..model.checkpoint import write_hf_checkpoint
from ..model.tokenizer import native_tokenizer_config
from ..outputs import check_output_path
from .calib import calibration_ids
from .engine import LayerReport, QuantSettings, iter_quantized_layers
from .packing import GPTQ_BITS, pack_awq, pack_gptq

GPTQ_GROUPS = (-1, 32, 64, 128)
AWQ_GROUPS = (32, 64, 128)
EXPERT_NAMINGS = ("legacy", "gptqmodel")
def output_name(short: str, naming: str) -> str:
    """Layer-relative output name: the canonical (legacy Mixtral) names, or the names GPTQModel loads."""
    return experts.to_gptqmodel(short) if naming == "gptqmodel" else short


@dataclass
class QuantReport:
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    out: Path | None = None


def check_settings(model: CanonicalModel, s: QuantSettings, expert_naming: str = "legacy") -> None:
    """Every combination the format cannot hold is refused before any work."""
    if expert_naming not in EXPERT_NAMINGS:
        raise MtoolError(f"--expert-naming must be one of {EXPERT_NAMINGS}, not {expert_naming!r}")
    if s.method == "gptq":
        if s.bits not in GPTQ_BITS:
            raise MtoolError(f"GPTQ stores {', '.join(map(str, GPTQ_BITS))} bits, not {s.bits}")
        if s.group_size not in GPTQ_GROUPS:
            raise MtoolError(f"GPTQ group size must be one of {GPTQ_GROUPS}, not {s.group_size}")
    elif s.method == "awq":
        if s.bits != 4:
            raise MtoolError(f"the AWQ GEMM format stores 4 bits, not {s.bits}")
        if s.group_size not in AWQ_GROUPS:
            raise MtoolError(f"AWQ group size must be one of {AWQ_GROUPS}, not {s.group_size}")
        if s.desc_act:
            raise MtoolError("--desc-act is a GPTQ option; AWQ has no act-order")
    if not 0 < s.damp < 1:
        raise MtoolError(f"--damp must be within (0, 1), got {s.damp}")
    for t in model.tensors:
        if not t.name.startswith("model.layers.") or not t.name.endswith(".weight"):
            continue
        short = t.name.split(".", 3)[3].removesuffix(".weight")
        if not model.spec.is_quantized_linear(short):
            continue
        out_f, in_f = t.shape
        if s.group_size != -1 and in_f % s.group_size:
            raise MtoolError(f"group size {s.group_size} does not divide the input dim {in_f} of {t.name}")
        if s.method == "gptq" and ((in_f * s.bits) % 32 or (out_f * s.bits) % 32):
            raise MtoolError(f"{s.bits}-bit GPTQ needs dims whose bits fill 32-bit words; {t.name} is {out_f} x {in_f}")
        if s.method == "awq" and out_f % 8:
            raise MtoolError(f"AWQ packs 8 output columns per word; {t.name} has {out_f}")


def _quant_shapes(name: str, out_f: int, in_f: int, s: QuantSettings) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    groups = 1 if s.group_size == -1 else in_f // s.group_size
    if s.method == "awq":
        return {"qweight": ((in_f, out_f // 8), torch.int32), "qzeros": ((groups, out_f // 8), torch.int32),
                "scales": ((groups, out_f), torch.float16)}
    return {"qweight": ((in_f * s.bits // 32, out_f), torch.int32), "qzeros": ((groups, out_f * s.bits // 32), torch.int32),
            "scales": ((groups, out_f), torch.float16), "g_idx": ((in_f,), torch.int32)}


def quantization_config(s: QuantSettings, moe: bool = False) -> dict:
    if s.method == "awq":
        return {"quant_method": "awq", "version": "gemm", "zero_point": True, "bits": s.bits,
                "group_size": s.group_size, "modules_to_not_convert": ["gate"] if moe else None}
    return {"quant_method": "gptq", "bits": s.bits, "group_size": s.group_size, "desc_act": s.desc_act, "sym": s.sym,
            "damp_percent": s.damp, "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq",
            "lm_head": False}


class _Layers:
    """Runs the engine lazily in file order and holds the current layer's output tensors."""

    def __init__(self, gen: Iterator[tuple[int, dict[str, torch.Tensor]]]):
        self.gen, self.index, self.tensors = gen, -1, {}

    def get(self, layer: int, name: str) -> torch.Tensor:
        while self.index < layer:
            self.index, self.tensors = next(self.gen)
        return self.tensors[name]


def export_quantized(model: CanonicalModel, out: Path, settings: QuantSettings, *, calib: Path | None = None,
                     nsamples: int = 16, seqlen: int = 128, seed: int = 0, force: bool = False,
                     progress: bool = True, on_layer: Callable[[LayerReport], None] | None = None,
                     expert_naming: str = "legacy") -> QuantReport:
    """Quantize `model` with GPTQ or AWQ and write the checkpoint to `out`."""
    check_settings(model, settings, expert_naming)
    inputs = (model.source, model.tokenizer_dir) + ((Path(calib),) if calib else ())
    check_output_path(Path(out), force=force, sources=inputs)
    ids = calibration_ids(model.tokenizer_dir, calib, nsamples, seqlen, seed)
    report = QuantReport()
    t_start = time.perf_counter()

    def produce() -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for i, layer, results, rep in iter_quantized_layers(model, ids, settings):
            prefix = f"model.layers.{i}."
            tensors = {}
            for n, p in layer.named_parameters():
                canonical = experts.from_gptqmodel(n)  # transformers' MoE module holds the router as mlp.gate
                if n.startswith("mlp.experts.") or canonical.removesuffix(".weight") in results:
                    continue  # quantized: packed below
                tensors[prefix + output_name(canonical, expert_naming)] = p.detach().to(torch.float16).cpu()
            for short, r in results.items():
                packed = (pack_awq(r.codes, r.zeros, r.scales) if settings.method == "awq"
                          else pack_gptq(r.codes, r.zeros, r.scales, r.g_idx, settings.bits))
                tensors.update({prefix + output_name(f"{short}.{k}", expert_naming): v for k, v in packed.items()})
            report.layers.append(rep)
            if on_layer:
                on_layer(rep)
            yield i, tensors

    layers = _Layers(produce())
    tensors: list[LazyTensor] = []
    for t in model.tensors:
        if t.name.startswith("model.layers."):
            i = int(t.name.split(".")[2])
            short = t.name.split(".", 3)[3]
            if model.spec.is_quantized_linear(short.removesuffix(".weight")) and short.endswith(".weight"):
                base = short.removesuffix(".weight")
                for k, (shape, dt) in _quant_shapes(t.name, t.shape[0], t.shape[1], settings).items():
                    n = f"model.layers.{i}." + output_name(f"{base}.{k}", expert_naming)
                    tensors.append(LazyTensor(n, shape, dt, lambda i=i, n=n: layers.get(i, n)))
                continue
            n = f"model.layers.{i}." + output_name(short, expert_naming)
            tensors.append(LazyTensor(n, t.shape, torch.float16, lambda i=i, n=n: layers.get(i, n)))
        else:
            tensors.append(LazyTensor(t.name, t.shape, torch.float16, lambda t=t: t.load().to(torch.float16)))
    config = hf_config(model)
    config["dtype"] = "float16"
    qcfg = quantization_config(settings, moe=model.moe)
    config["quantization_config"] = qcfg
    extra = {"quantize_config.json": json.dumps(qcfg, indent=2).encode()} if settings.method == "gptq" else {}
    report.out = write_hf_checkpoint(out, config, tensors, copy_from=model.tokenizer_dir,
                                     tokenizer_config=native_tokenizer_config(model.tokenizer_dir), force=force,
                                     sources=inputs, progress=progress, extra_files=extra)
    report.seconds = time.perf_counter() - t_start
    return report
