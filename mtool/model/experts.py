"""Expert naming, in one place and in both directions.

- legacy (the canonical form): `block_sparse_moe.experts.E.w1|w3|w2` and router `block_sparse_moe.gate`,
  one tensor per expert, as Mixtral's `save_pretrained` long wrote it and vLLM maps it;
- fused (transformers v5): `mlp.experts.gate_up_proj` [E, 2F, H] (gate rows first),
  `mlp.experts.down_proj` [E, H, F], router `mlp.gate`;
- GPTQModel: `mlp.experts.E.gate_proj|up_proj|down_proj`, router `mlp.gate`;
- GGUF: one stacked tensor per projection and layer (`blk.N.ffn_gate_exps` ...).

Names here are layer-relative (after `model.layers.N.`) unless a function says otherwise.
"""

from __future__ import annotations

import re

import gguf

ROUTER = "block_sparse_moe.gate"
FUSED_ROUTER = "mlp.gate"
FUSED_GATE_UP, FUSED_DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"
ROLES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # legacy -> GPTQModel / fused role
_GGUF = {"w1": gguf.MODEL_TENSOR.FFN_GATE_EXP, "w3": gguf.MODEL_TENSOR.FFN_UP_EXP, "w2": gguf.MODEL_TENSOR.FFN_DOWN_EXP}
_LEGACY = re.compile(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])(\.\w+)?$")
_GPTQMODEL = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)(\.\w+)?$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def legacy(e: int, w: str) -> str:
    """Layer-relative canonical name (without suffix) of expert `e`'s projection w1/w2/w3."""
    return f"block_sparse_moe.experts.{e}.{w}"


def parse(short: str) -> tuple[int, str] | None:
    """(expert, w1|w2|w3) of a layer-relative canonical expert name (any suffix), else None."""
    m = _LEGACY.match(short)
    return (int(m.group(1)), m.group(2)) if m else None


def split_layer(name: str) -> tuple[int, str] | None:
    """(layer, layer-relative name) of a full `model.layers.N.*` name, else None."""
    m = _LAYER.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def to_gptqmodel(short: str) -> str:
    """Canonical -> GPTQModel's names for its fused-model Mixtral loader (others unchanged)."""
    m = _LEGACY.match(short)
    if m:
        return f"mlp.experts.{m.group(1)}.{ROLES[m.group(2)]}{m.group(3) or ''}"
    if short.startswith(ROUTER + "."):
        return FUSED_ROUTER + short[len(ROUTER):]
    return short


def from_gptqmodel(short: str) -> str:
    """GPTQModel's names (or the fused router) -> canonical (others unchanged)."""
    m = _GPTQMODEL.match(short)
    if m:
        w = next(k for k, v in ROLES.items() if v == m.group(2))
        return f"{legacy(int(m.group(1)), w)}{m.group(3) or ''}"
    if short.startswith(FUSED_ROUTER + "."):
        return ROUTER + short[len(FUSED_ROUTER):]
    return short


def fused_rows(e: int, w: str, n_ff: int, hidden: int) -> tuple[str, int, int]:
    """(fused tensor, first row, rows) holding expert e's projection w, viewing the fused
    tensor as [E * rows, cols]: what the adapter reads without loading the whole stack."""
    if w == "w2":
        return FUSED_DOWN, e * hidden, hidden
    return FUSED_GATE_UP, e * 2 * n_ff + (n_ff if w == "w3" else 0), n_ff


def to_fused(sd: dict, n_experts: int) -> dict:
    """A layer's canonical state dict -> the fused parameters of transformers' MoE module (torch tensors)."""
    import torch

    sd = dict(sd)
    sd[FUSED_GATE_UP] = torch.stack([torch.cat([sd.pop(legacy(e, "w1") + ".weight"), sd.pop(legacy(e, "w3") + ".weight")])
                                     for e in range(n_experts)])
    sd[FUSED_DOWN] = torch.stack([sd.pop(legacy(e, "w2") + ".weight") for e in range(n_experts)])
    sd[FUSED_ROUTER + ".weight"] = sd.pop(ROUTER + ".weight")
    return sd


class FusedView:
    """Read/write one expert's w1 / w3 / w2 inside a transformers MoE layer's fused parameters."""

    def __init__(self, layer, n_ff: int):
        self.gate_up, self.down, self.f = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj, n_ff

    def get(self, e: int, w: str):  # -> torch.Tensor
        return {"w1": self.gate_up.data[e, : self.f], "w3": self.gate_up.data[e, self.f :], "w2": self.down.data[e]}[w]

    def set(self, e: int, w: str, value) -> None:
        self.get(e, w).copy_(value)


def gguf_stack(layer: int, w: str) -> str:
    """GGUF name of the stacked expert tensor of projection w1/w2/w3 in `layer`."""
    return gguf.TENSOR_NAMES[_GGUF[w]].format(bid=layer) + ".weight"
