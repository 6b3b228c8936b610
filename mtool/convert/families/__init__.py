"""Family adapters: one module per family, selected by config.json `architectures`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ...checkpoint import SUPPORTED_DTYPES, CheckpointReader
from ...errors import MtoolError
from ..canonical import CanonicalModel
from . import llama, mixtral, telechat

# architectures entry -> adapter. Adding a family = one module + one line here.
ADAPTERS: dict[str, Callable[[CheckpointReader], CanonicalModel]] = {
    "LlamaForCausalLM": llama.adapt,
    "MistralForCausalLM": llama.adapt,
    "MixtralForCausalLM": mixtral.adapt,
    "TelechatForCausalLM": telechat.adapt_telechat,
    "TELECHAT": telechat.adapt_telechat52b,
}

# Families transformers can load without remote code; others are verified through their canonical form.
NATIVE = {"LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM"}


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
