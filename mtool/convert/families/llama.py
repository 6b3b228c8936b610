"""Llama-family adapter (LlamaForCausalLM, MistralForCausalLM): already canonical.

Covers Yi-34B/SUS-Chat (GQA, untied), Ziya2-13B (embedding rows beyond the tokenizer's
pieces) and any checkpoint in HF Llama naming. The adapter only validates names and
shapes against the config and hands the tensors through. The shape tables here are the
canonical layout every other adapter produces.
"""

from __future__ import annotations

from ...checkpoint import CheckpointReader
from ...errors import MtoolError
from ..canonical import CanonicalModel, LazyTensor, check_shapes, normalize_llama_config

# Tensors some checkpoints carry that no runtime needs (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Shapes = dict[str, tuple[int, ...]]


def attention_shapes(cfg: dict, i: int) -> Shapes:
    h, hd, nh, nkv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    p = f"model.layers.{i}"
    return {
        f"{p}.input_layernorm.weight": (h,),
        f"{p}.self_attn.q_proj.weight": (nh * hd, h),
        f"{p}.self_attn.k_proj.weight": (nkv * hd, h),
        f"{p}.self_attn.v_proj.weight": (nkv * hd, h),
        f"{p}.self_attn.o_proj.weight": (h, nh * hd),
        f"{p}.post_attention_layernorm.weight": (h,),
    }


def attention_bias_shapes(cfg: dict, i: int) -> Shapes:
    h, hd, nh, nkv = cfg["hidden_size"], cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    p = f"model.layers.{i}.self_attn"
    return {f"{p}.q_proj.bias": (nh * hd,), f"{p}.k_proj.bias": (nkv * hd,), f"{p}.v_proj.bias": (nkv * hd,),
            f"{p}.o_proj.bias": (h,)}


def dense_mlp_shapes(cfg: dict, i: int) -> Shapes:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    p = f"model.layers.{i}.mlp"
    return {f"{p}.gate_proj.weight": (f, h), f"{p}.up_proj.weight": (f, h), f"{p}.down_proj.weight": (h, f)}


def dense_mlp_bias_shapes(cfg: dict, i: int) -> Shapes:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    p = f"model.layers.{i}.mlp"
    return {f"{p}.gate_proj.bias": (f,), f"{p}.up_proj.bias": (f,), f"{p}.down_proj.bias": (h,)}


def moe_shapes(cfg: dict, i: int) -> Shapes:
    """Mixtral's legacy per-expert layout (what save_pretrained writes and vLLM maps)."""
    h, f, e = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_local_experts"]
    p = f"model.layers.{i}.block_sparse_moe"
    shapes: Shapes = {f"{p}.gate.weight": (e, h)}
    for x in range(e):
        shapes.update({f"{p}.experts.{x}.w1.weight": (f, h), f"{p}.experts.{x}.w2.weight": (h, f),
                       f"{p}.experts.{x}.w3.weight": (f, h)})
    return shapes


def canonical_shapes(cfg: dict) -> Shapes:
    """Canonical tensor names and shapes implied by a normalized config, in write order."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    shapes: Shapes = {"model.embed_tokens.weight": (v, h)}
    mlp = moe_shapes if cfg.get("num_local_experts") else dense_mlp_shapes
    for i in range(cfg["num_hidden_layers"]):
        shapes.update(attention_shapes(cfg, i))
        shapes.update(mlp(cfg, i))
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def bias_shapes(cfg: dict) -> Shapes:
    """Biases a canonical checkpoint may carry (attention_bias / mlp_bias)."""
    shapes: Shapes = {}
    for i in range(cfg["num_hidden_layers"]):
        shapes.update(attention_bias_shapes(cfg, i))
        if not cfg.get("num_local_experts"):
            shapes.update(dense_mlp_bias_shapes(cfg, i))
    return shapes


def in_layer_order(names: list[str], expected: Shapes) -> list[str]:
    """Sort names so each bias follows its weight and the tensors of a layer stay together."""
    position = {n: (i, 0) for i, n in enumerate(expected)}
    for n in names:
        if n not in position:
            position[n] = (position[n.removesuffix(".bias") + ".weight"][0], 1)
    return sorted(names, key=position.__getitem__)


def adapt(reader: CheckpointReader, *, model_type: str = "llama", arch: str = "LlamaForCausalLM") -> CanonicalModel:
    """Validate an HF Llama-named checkpoint and expose it as a CanonicalModel."""
    where = str(reader.path)
    cfg = normalize_llama_config(reader.config, where)
    cfg["model_type"] = model_type
    cfg["architectures"] = [arch]
    expected = canonical_shapes(cfg)
    optional = bias_shapes(cfg)
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
        raise MtoolError(f"{where}: unexpected tensor {unknown[0]} for a {arch} checkpoint ({len(unknown)} unexpected)")
    names = in_layer_order(list(expected) + [n for n in optional if n in found], expected)
    tensors = [LazyTensor(n, tuple(found[n]), reader.info(n).dtype, (lambda n=n: reader.load(n))) for n in names]
    return CanonicalModel(model_type, cfg, tensors, reader.path, reader.path)
