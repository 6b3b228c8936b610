"""Llama-family adapter (LlamaForCausalLM, MistralForCausalLM): already canonical.

Covers Yi-34B/SUS-Chat (GQA, untied), Ziya2-13B (embedding rows beyond the tokenizer's
pieces) and any checkpoint in HF Llama naming. The adapter only validates names and
shapes against the config and hands the tensors through.
"""

from __future__ import annotations

from ...checkpoint import CheckpointReader
from ...errors import MtoolError
from ..canonical import CanonicalModel, LazyTensor, check_shapes, normalize_llama_config

# Tensors some checkpoints carry that no runtime needs (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def llama_expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes implied by a normalized Llama config, in write order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (nh * hd, h),
            f"{p}.self_attn.k_proj.weight": (nkv * hd, h),
            f"{p}.self_attn.v_proj.weight": (nkv * hd, h),
            f"{p}.self_attn.o_proj.weight": (h, nh * hd),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.mlp.gate_proj.weight": (f, h),
            f"{p}.mlp.up_proj.weight": (f, h),
            f"{p}.mlp.down_proj.weight": (h, f),
        })
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def llama_optional_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Biases a Llama checkpoint may carry (attention_bias / mlp_bias)."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.self_attn.q_proj.bias": (nh * hd,),
            f"{p}.self_attn.k_proj.bias": (nkv * hd,),
            f"{p}.self_attn.v_proj.bias": (nkv * hd,),
            f"{p}.self_attn.o_proj.bias": (h,),
            f"{p}.mlp.gate_proj.bias": (f,),
            f"{p}.mlp.up_proj.bias": (f,),
            f"{p}.mlp.down_proj.bias": (h,),
        })
    return shapes


def adapt(reader: CheckpointReader) -> CanonicalModel:
    """Validate an HF Llama-named checkpoint and expose it as a CanonicalModel."""
    where = str(reader.path)
    cfg = normalize_llama_config(reader.config, where)
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    expected = llama_expected_shapes(cfg)
    optional = llama_optional_shapes(cfg)
    found = {i.name: i.shape for i in reader.iter_infos()}
    check_shapes(found, expected, where)
    for name, shape in optional.items():
        if name in found and tuple(found[name]) != shape:
            raise MtoolError(f"{where}: shape mismatch for {name}: checkpoint has {list(found[name])}, expected {list(shape)}")
    known = set(expected) | set(optional)
    if cfg["tie_word_embeddings"]:
        known.add("lm_head.weight")  # some tied checkpoints store a copy; the copy is not written
    unknown = [n for n in found if n not in known and not n.endswith(IGNORED_SUFFIXES)]
    if unknown:
        raise MtoolError(f"{where}: unexpected tensor {unknown[0]} for a Llama checkpoint ({len(unknown)} unexpected)")

    # biases go right after their weights, so the tensors of a layer stay together
    position = {n: (i, 0) for i, n in enumerate(expected)}
    for n in optional:
        if n in found:
            position[n] = (position[n.removesuffix(".bias") + ".weight"][0], 1)
    names = sorted(position, key=position.__getitem__)
    tensors = [
        LazyTensor(n, tuple(found[n]), reader.info(n).dtype, (lambda n=n: reader.load(n))) for n in names
    ]
    return CanonicalModel("llama", cfg, tensors, reader.path, reader.path)

