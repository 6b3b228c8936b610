"""Llama: the spec, and the adapter for any checkpoint already in its spec's HF names.

Covers Llama/Mistral (Yi-34B/SUS-Chat with GQA and untied head, Ziya2-13B with embedding
rows beyond the tokenizer's pieces) and, through `adapt`, every spec whose checkpoints need
no re-expression (Mixtral, Qwen2): names and shapes are checked against the config and the
tensors handed through. MoE checkpoints in the fused layout are read expert by expert.
"""

from __future__ import annotations

from ..arch import ATTENTION, COMMON_CONFIG, DENSE_MLP, ArchSpec, AwqMapping
from ..canonical import (CanonicalModel, LazyTensor, bias_shapes, canonical_shapes, check_shapes, in_layer_order,
                         normalize_config, rearranged, stored)
from ..checkpoint import CheckpointReader
from ...errors import InputError
from .. import experts

ATTN_GROUPS = (ATTENTION[:3], ATTENTION[3:])
ATTN_AWQ = (AwqMapping("input_layernorm", ATTENTION[:3], "self_attn"),
            AwqMapping("self_attn.v_proj", ATTENTION[3:], same_shape=True))

LLAMA = ArchSpec(
    name="llama", hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    config_class="LlamaConfig", modeling="transformers.models.llama.modeling_llama",
    decoder_layer="LlamaDecoderLayer", rotary="LlamaRotaryEmbedding", norm="LlamaRMSNorm", gguf_arch="LLAMA",
    linear_groups=ATTN_GROUPS + (DENSE_MLP[:2], DENSE_MLP[2:]),
    awq=ATTN_AWQ + (AwqMapping("post_attention_layernorm", DENSE_MLP[:2], "mlp"),
                    AwqMapping("mlp.up_proj", DENSE_MLP[2:])),
    gguf_extra=("vocab_size", "rope_dimension_count"), permute_qk=True,
    config_fields=COMMON_CONFIG + ("attention_bias", "mlp_bias"), optional_biases=ATTENTION + DENSE_MLP,
)

# Tensors some checkpoints carry that no runtime needs (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _fused_slice(reader: CheckpointReader, name: str, src: str, row0: int, rows: int, cols: int) -> LazyTensor:
    """Rows [row0, row0+rows) of a fused expert tensor, as the canonical expert tensor `name`."""

    def part(start: int, count: int, out=None):
        if start < 0 or start + count > rows:
            raise ValueError(f"rows {start}..{start + count} are outside {name} ({rows} rows)")
        return reader.load_rows_array(src, row0 + start, count, out=out)

    return rearranged(name, (rows, cols), reader.info(src).dtype, lambda: reader.load_rows_array(src, row0, rows),
                      rows=part)


def _fused_experts(reader: CheckpointReader, spec: ArchSpec, cfg: dict) -> dict[str, LazyTensor]:
    """Canonical per-expert tensors over a fused-layout MoE checkpoint, as row spans (never whole)."""
    h, f, n = cfg["hidden_size"], cfg["intermediate_size"], int(cfg[spec.moe.count_key])
    out: dict[str, LazyTensor] = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for short, shape in ((experts.FUSED_GATE_UP, (n, 2 * f, h)), (experts.FUSED_DOWN, (n, h, f)),
                             (experts.FUSED_ROUTER + ".weight", (n, h))):
            if p + short not in reader:
                raise InputError(f"{reader.path}: MoE layer {i} lacks {p + short}")
            check_shapes({p + short: reader.info(p + short).shape}, {p + short: shape}, str(reader.path))
        router = p + experts.FUSED_ROUTER + ".weight"
        out[f"{p}{experts.ROUTER}.weight"] = stored(reader, router, f"{p}{experts.ROUTER}.weight")
        for x in range(n):
            for w in ("w1", "w3", "w2"):
                src, row0, rows = experts.fused_rows(x, w, f, h)
                name = f"{p}{experts.legacy(x, w)}.weight"
                out[name] = _fused_slice(reader, name, p + src, row0, rows, h if w != "w2" else f)
    return out


def adapt(reader: CheckpointReader, spec: ArchSpec = LLAMA) -> CanonicalModel:
    """Check a checkpoint in `spec`'s HF names against its config and expose it as a CanonicalModel."""
    where = str(reader.path)
    cfg = normalize_config(reader.config, where, spec)
    cfg["model_type"], cfg["architectures"] = spec.name, [spec.hf_class]
    expected, optional = canonical_shapes(spec, cfg), bias_shapes(spec, cfg)
    found = {i.name: i.shape for i in reader.iter_infos()}
    lazy = _fused_experts(reader, spec, cfg) if spec.moe and any(experts.FUSED_GATE_UP in n for n in found) else {}
    if spec.moe and not lazy:
        missing = [n for n in expected if experts.parse(n.split(".", 3)[-1]) and n not in found]
        if missing:
            raise InputError(f"{where}: MoE expert tensor {missing[0]} is missing ({len(missing)} missing)")
    check_shapes(found, {n: s for n, s in expected.items() if n not in lazy}, where)
    for name, shape in optional.items():
        if name in found and tuple(found[name]) != shape:
            raise InputError(f"{where}: shape mismatch for {name}: checkpoint has {list(found[name])}, "
                             f"expected {list(shape)}")
    known = set(expected) | set(optional)
    if lazy:  # the fused tensors stand for the canonical per-expert ones
        fused = (experts.FUSED_GATE_UP, experts.FUSED_DOWN, experts.FUSED_ROUTER + ".weight")
        known |= {n for n in found if n.split(".", 3)[-1] in fused}
    if cfg["tie_word_embeddings"]:
        known.add("lm_head.weight")  # some tied checkpoints store a copy; the copy is not written
    unknown = [n for n in found if n not in known and not n.endswith(IGNORED_SUFFIXES)]
    if unknown:
        raise InputError(f"{where}: unexpected tensor {unknown[0]} for a {spec.hf_class} checkpoint "
                         f"({len(unknown)} unexpected)")
    names = in_layer_order(list(expected) + [n for n in optional if n in found], expected)
    tensors = [lazy.get(n) or stored(reader, n) for n in names]
    return CanonicalModel(spec.name, spec, cfg, tensors, reader.path, reader.path)
