"""Run GPTQ / AWQ checkpoints by dequantizing them in torch, following the published layouts.

No maintained GPTQ/AWQ kernel runs on CPU without extra installs, so the candidate is turned
back into float32 weights with the layouts' own formulas (mtool.quantize.packing) and run as
a plain LlamaForCausalLM. Where `gptqmodel` is installed, tests also compare against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..device import resolve_device
from ..errors import MtoolError
from ..model import experts
from ..model.canonical import CanonicalModel, LazyTensor, bias_shapes, canonical_shapes, in_layer_order, normalize_config
from ..model.checkpoint import CheckpointReader, read_json
from ..model.families import spec_for
from ..quantize.packing import dequantize_awq, dequantize_gptq


def quantization_config(path: Path) -> dict | None:
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    return json.loads(cfg_path.read_text()).get("quantization_config")


def dequantized_model(path: Path) -> CanonicalModel:
    """A GPTQ or AWQ checkpoint as a canonical model whose tensors dequantize (to float32) when loaded,
    so a runner can take it one layer at a time."""
    reader = CheckpointReader(path)
    config = dict(reader.config)
    q = config.pop("quantization_config", None) or {}
    method = q.get("quant_method")
    if method not in ("gptq", "awq"):
        raise MtoolError(f"{path}: quantization method {method!r} is not supported (gptq, awq)")
    if method == "gptq" and q.get("checkpoint_format", "gptq") != "gptq":
        raise MtoolError(f"{path}: GPTQ checkpoint_format {q.get('checkpoint_format')!r} is not supported (gptq v1)")
    spec = spec_for(config, str(path))
    cfg = normalize_config(config, str(path), spec)
    stored = {_legacy_moe_name(n): n for n in reader.names()}  # canonical -> stored name

    def dequantized(prefix: str) -> torch.Tensor:
        parts = {k: reader.load(f"{prefix}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")
                 if f"{prefix}.{k}" in reader}
        return (dequantize_gptq(parts, int(q["bits"])) if method == "gptq"
                else dequantize_awq(parts, int(q["group_size"])))

    expected = canonical_shapes(spec, cfg)
    names = in_layer_order(list(expected) + [n for n in bias_shapes(spec, cfg) if n in stored], expected)
    tensors = []
    for n in names:
        packed = stored.get(n.removesuffix(".weight") + ".qweight")
        if packed:
            load = (lambda p=packed.removesuffix(".qweight"): dequantized(p))
            shape = expected[n]
        elif n in stored:
            load, shape = (lambda s=stored[n]: reader.load(s).to(torch.float32)), tuple(reader.info(stored[n]).shape)
        else:
            raise MtoolError(f"{path}: tensor {n} is missing")
        tensors.append(LazyTensor(n, shape, torch.float32, load))
    return CanonicalModel(spec.name, spec, cfg, tensors, Path(path), Path(path))


def dequantized_state_dict(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config without quantization_config, float32 state dict) of a GPTQ or AWQ checkpoint."""
    model = dequantized_model(path)
    config = {k: v for k, v in read_json(Path(path) / "config.json").items() if k != "quantization_config"}
    return config, {t.name: t.load() for t in model.tensors}


def _legacy_moe_name(name: str) -> str:
    """GPTQModel's Mixtral names (mlp.experts.E.gate_proj, mlp.gate) -> the legacy names transformers maps."""
    at = experts.split_layer(name)
    return f"model.layers.{at[0]}.{experts.from_gptqmodel(at[1])}" if at else name


class QuantizedRunner:
    """A GPTQ/AWQ checkpoint, dequantized, run by transformers in float32."""

    kind = "dequantized"

    def __init__(self, path: Path, device: str = "auto"):
        import tempfile

        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        config, sd = dequantized_state_dict(path)
        # through a temporary plain checkpoint, so transformers builds buffers and ties weights itself
        with tempfile.TemporaryDirectory(prefix="mtool-deq-") as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            save_file({k: v.contiguous() for k, v in sd.items()}, str(Path(tmp) / "model.safetensors"))
            del sd
            self.model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(self.device).eval()
        q = quantization_config(path) or {}
        self.vocab_size = int(self.model.config.vocab_size)
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.label = f"{q.get('quant_method')} {q.get('bits')}-bit, dequantized in torch ({self.device}, f32)"

    def logits(self, ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return self.model(torch.tensor([ids], device=self.device)).logits[0].float().cpu().numpy()
