"""Mixtral adapter (Huozi 3.5): MixtralForCausalLM in the legacy or the fused expert layout.

Canonical form is the legacy layout, one tensor per expert
(`block_sparse_moe.experts.E.w1/w2/w3`, router `block_sparse_moe.gate`): it is what
`save_pretrained` writes, what vLLM maps, and it lets writers stream expert by expert.
The fused layout transformers v5 uses in memory (`mlp.gate`, `mlp.experts.gate_up_proj`
[E, 2F, H] with gate rows first, `mlp.experts.down_proj` [E, H, F]) is read expert by expert
as contiguous row spans, never whole.
"""

from __future__ import annotations

import re

from ...checkpoint import CheckpointReader
from ...errors import MtoolError
from ..canonical import CanonicalModel, LazyTensor, check_shapes, normalize_llama_config, require
from . import llama

ARCH = "MixtralForCausalLM"


def _fused_source(reader: CheckpointReader, cfg: dict) -> dict[str, LazyTensor]:
    """Canonical per-expert LazyTensors over a fused-layout checkpoint."""
    h, f, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    out: dict[str, LazyTensor] = {}
    for i in range(cfg["num_hidden_layers"]):
        src = f"model.layers.{i}.mlp"
        dst = f"model.layers.{i}.block_sparse_moe"
        gate_up, down = f"{src}.experts.gate_up_proj", f"{src}.experts.down_proj"
        for name, shape in ((gate_up, (e, 2 * f, h)), (down, (e, h, f)), (f"{src}.gate.weight", (e, h))):
            if name not in reader:
                raise MtoolError(f"{reader.path}: MoE layer {i} lacks {name}")
            if reader.info(name).shape != shape:
                raise MtoolError(f"{reader.path}: shape mismatch for {name}: checkpoint has "
                                 f"{list(reader.info(name).shape)}, config implies {list(shape)}")
        dt = reader.info(gate_up).dtype
        out[f"{dst}.gate.weight"] = LazyTensor(f"{dst}.gate.weight", (e, h), reader.info(f"{src}.gate.weight").dtype,
                                               lambda n=f"{src}.gate.weight": reader.load(n))
        for x in range(e):
            for wname, name, row0, rows, cols in (("w1", gate_up, x * 2 * f, f, h), ("w3", gate_up, x * 2 * f + f, f, h),
                                                 ("w2", down, x * h, h, f)):
                cn = f"{dst}.experts.{x}.{wname}.weight"
                out[cn] = LazyTensor(cn, (rows, cols), dt,
                                     lambda name=name, row0=row0, rows=rows: reader.load_rows(name, row0, rows))
    return out


def adapt(reader: CheckpointReader) -> CanonicalModel:
    where = str(reader.path)
    cfg = normalize_llama_config(reader.config, where)
    for key in ("num_local_experts", "num_experts_per_tok"):
        require(cfg, key, where)
    cfg["model_type"] = "mixtral"
    cfg["architectures"] = [ARCH]
    fused = any(".mlp.experts.gate_up_proj" in n for n in reader.names())
    if not fused:
        experts = [n for n in reader.names() if re.search(r"\.block_sparse_moe\.experts\.\d+\.w[123]\.weight$", n)]
        expected_experts = {n for n in llama.canonical_shapes(cfg) if ".experts." in n}
        missing = sorted(expected_experts - set(experts), key=lambda n: [int(t) if t.isdigit() else t for t in n.split(".")])
        if missing:
            raise MtoolError(f"{where}: MoE expert tensor {missing[0]} is missing ({len(missing)} missing)")
        return llama.adapt(reader, model_type="mixtral", arch=ARCH)
    # fused: attention, norms and embeddings as in Llama; experts re-sliced per expert
    expected = llama.canonical_shapes(cfg)
    moe = _fused_source(reader, cfg)
    found = {i.name: i.shape for i in reader.iter_infos()}
    dense = {n: s for n, s in expected.items() if n not in moe}
    check_shapes(found, dense, where)
    tensors = []
    for n in expected:
        tensors.append(moe[n] if n in moe else LazyTensor(n, tuple(found[n]), reader.info(n).dtype, lambda n=n: reader.load(n)))
    return CanonicalModel("mixtral", cfg, tensors, reader.path, reader.path)
