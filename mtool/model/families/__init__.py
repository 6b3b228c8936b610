"""Family adapters, selected by config.json `architectures`, and the architecture specs they produce."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from ...errors import MtoolError
from ..arch import ArchSpec
from ..canonical import CanonicalModel
from ..checkpoint import SUPPORTED_DTYPES, CheckpointReader
from . import llama, mixtral, qwen2, telechat

SPECS: tuple[ArchSpec, ...] = (llama.LLAMA, mixtral.MIXTRAL, qwen2.QWEN2)

# architectures entry -> adapter. Adding a family = one module + one line here.
ADAPTERS: dict[str, Callable[[CheckpointReader], CanonicalModel]] = {
    "LlamaForCausalLM": llama.adapt,
    "MistralForCausalLM": llama.adapt,
    "MixtralForCausalLM": partial(llama.adapt, spec=mixtral.MIXTRAL),
    "Qwen2ForCausalLM": qwen2.adapt,
    "TelechatForCausalLM": telechat.adapt_telechat,
    "TELECHAT": telechat.adapt_telechat52b,
}

# Sources transformers loads without remote code; others are verified through their canonical form.
NATIVE = {a for s in SPECS if s.native for a in s.hf_architectures}


def spec_for(config: dict, where: str) -> ArchSpec:
    """The spec of a checkpoint already in a spec's HF names (e.g. a GPTQ/AWQ output), by `architectures`."""
    for arch in config.get("architectures") or []:
        for spec in SPECS:
            if arch in spec.hf_architectures:
                return spec
    raise MtoolError(f"{where}/config.json: architectures {config.get('architectures')} name no known architecture "
                     f"(known: {', '.join(a for s in SPECS for a in s.hf_architectures)})")


def load_canonical(path: str | Path) -> CanonicalModel:
    """Open an HF model directory and normalize it through its family adapter."""
    reader = CheckpointReader(path)
    archs = reader.config.get("architectures") or []
    if not archs:
        raise MtoolError(f"{path}/config.json has no 'architectures' entry; cannot tell the model family")
    for arch in archs:
        if arch in ADAPTERS:
            model = ADAPTERS[arch](reader)
            for t in model.tensors:
                if t.dtype not in SUPPORTED_DTYPES:
                    raise MtoolError(f"tensor {t.name} has dtype {t.dtype}; only f32/f16/bf16 sources are supported")
            return model
    raise MtoolError(
        f"unknown architecture {archs[0]!r} in {path}/config.json (supported: {', '.join(sorted(ADAPTERS))})"
    )
