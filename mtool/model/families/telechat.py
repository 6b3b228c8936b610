"""TeleChat adapters: 7B/12B (`TelechatForCausalLM`) and 52B (`TELECHAT`, GPT-2 style).

Both are re-expressed exactly as an HF `LlamaForCausalLM` (facts in shared/REFERENCE.md):

7B/12B: `key_value` [2*nkv*d, H] holds K and V interleaved per head (rows [h*2d, h*2d+d) are
K of head h, the next d rows its V) and is split into k_proj / v_proj; `dense` and
`down_proj` carry biases, so the canonical config has attention_bias and mlp_bias, and the
biases TeleChat lacks (q, k, v, gate, up) are zeros. RoPE is rotate-half, like HF Llama, so no
row permutation is needed. The 7B checkpoint ties embeddings and has no `transformer.` prefix.

52B: Conv1D weights are stored [in, out] and transposed; `c_attn` is Q|K|V along out, `c_fc`
is gate|up along out. muP scales logits by output_mult / mup_scale_factor and embeddings by
input_mult; embeddings and lm_head are untied, so both factors fold exactly into their rows.
"""

from __future__ import annotations

import numpy as np

from ..checkpoint import CheckpointReader
from ...errors import MtoolError
from ..canonical import (CanonicalModel, LazyTensor, bias_shapes, canonical_shapes, check_shapes, in_layer_order,
                         head_dim, normalize_config, rearranged, require, stored, zeros)
from .llama import LLAMA


def _kv_heads(cfg: dict) -> int:
    return int(cfg.get("num_key_value_heads") or cfg.get("n_head_kv") or cfg.get("num_kv_heads") or cfg["n_head"])


def _canonical_config(src: dict, *, hidden: int, ffn: int, max_pos: int, theta: float, bias: bool, where: str) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": ffn,
        "num_hidden_layers": int(require(src, "n_layer", where)),
        "num_attention_heads": int(require(src, "n_head", where)),
        "num_key_value_heads": _kv_heads(src),
        "vocab_size": int(require(src, "vocab_size", where)),
        "rms_norm_eps": float(src.get("layer_norm_epsilon", 1e-5)),
        "max_position_embeddings": int(max_pos), "rope_theta": float(theta),
        "tie_word_embeddings": bool(src.get("tie_word_embeddings", False)),
        "attention_bias": bias, "mlp_bias": bias, "hidden_act": "silu",
        "bos_token_id": src.get("bos_token_id"), "eos_token_id": src.get("eos_token_id"),
        "pad_token_id": src.get("pad_token_id"),
    }
    return normalize_config(cfg, where, LLAMA)


def _check_kv(reader: CheckpointReader, name: str, cfg: dict, where: str) -> None:
    rows, cols = reader.info(name).shape
    want = 2 * cfg["num_key_value_heads"] * head_dim(cfg)
    if rows != want or cols != cfg["hidden_size"]:
        raise MtoolError(
            f"{where}: {name} has shape [{rows}, {cols}], but n_head/kv heads={cfg['num_key_value_heads']} x head_dim="
            f"{head_dim(cfg)} x 2 (K and V) and hidden {cfg['hidden_size']} need [{want}, {cfg['hidden_size']}]"
        )


def adapt_telechat(reader: CheckpointReader) -> CanonicalModel:
    """TeleChat 7B/12B (`TelechatForCausalLM`)."""
    where, src = str(reader.path), reader.config
    hidden = int(src.get("hidden_size") or require(src, "n_embd", where))
    cfg = _canonical_config(
        src, hidden=hidden, ffn=int(require(src, "ffn_hidden_size", where)),
        max_pos=src.get("training_seqlen") or src.get("seq_length") or 4096,
        theta=src.get("rope_theta", src.get("rotary_base", 10000.0)), bias=True, where=where,
    )
    pre = "transformer." if "transformer.word_embeddings.weight" in reader else ""
    nkv, d = cfg["num_key_value_heads"], head_dim(cfg)
    dt = reader.info(f"{pre}word_embeddings.weight").dtype
    src_names: dict[str, str] = {"model.embed_tokens.weight": f"{pre}word_embeddings.weight",
                                 "model.norm.weight": f"{pre}ln_f.weight"}
    if not cfg["tie_word_embeddings"]:
        src_names["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg["num_hidden_layers"]):
        s, c = f"{pre}h.{i}", f"model.layers.{i}"
        src_names.update({
            f"{c}.input_layernorm.weight": f"{s}.input_layernorm.weight",
            f"{c}.self_attn.q_proj.weight": f"{s}.self_attention.query.weight",
            f"{c}.self_attn.o_proj.weight": f"{s}.self_attention.dense.weight",
            f"{c}.self_attn.o_proj.bias": f"{s}.self_attention.dense.bias",
            f"{c}.post_attention_layernorm.weight": f"{s}.post_attention_layernorm.weight",
            f"{c}.mlp.gate_proj.weight": f"{s}.mlp.gate_proj.weight",
            f"{c}.mlp.up_proj.weight": f"{s}.mlp.up_proj.weight",
            f"{c}.mlp.down_proj.weight": f"{s}.mlp.down_proj.weight",
            f"{c}.mlp.down_proj.bias": f"{s}.mlp.down_proj.bias",
        })
    expected = canonical_shapes(LLAMA, cfg) | bias_shapes(LLAMA, cfg)
    missing = [s for s in src_names.values() if s not in reader]
    if missing:
        raise MtoolError(f"{where}: tensor {missing[0]} is missing")
    found = {c: reader.info(s).shape for c, s in src_names.items()}
    check_shapes(found, {c: expected[c] for c in src_names}, where)

    tensors: dict[str, LazyTensor] = {c: stored(reader, s, c) for c, s in src_names.items()}
    for i in range(cfg["num_hidden_layers"]):
        kv_name, c = f"{pre}h.{i}.self_attention.key_value.weight", f"model.layers.{i}.self_attn"
        if kv_name not in reader:
            raise MtoolError(f"{where}: tensor {kv_name} is missing")
        _check_kv(reader, kv_name, cfg, where)
        kv_dt = reader.info(kv_name).dtype
        for which, part in (("k_proj", 0), ("v_proj", 1)):
            tensors[f"{c}.{which}.weight"] = rearranged(
                f"{c}.{which}.weight", (nkv * d, hidden), kv_dt,
                lambda n=kv_name, part=part: reader.load_array(n).reshape(nkv, 2, d, hidden)[:, part]
                .reshape(nkv * d, hidden).copy(),
            )
    for name, shape in expected.items():
        if name not in tensors:
            if not name.endswith(".bias"):
                raise MtoolError(f"{where}: no source for canonical tensor {name}")
            tensors[name] = zeros(name, shape, dt)
    order = in_layer_order(list(tensors), canonical_shapes(LLAMA, cfg))
    return CanonicalModel("telechat", LLAMA, cfg, [tensors[n] for n in order], reader.path, reader.path)


def _mup_factors(src: dict) -> tuple[float, float]:
    if not src.get("use_mup"):
        return 1.0, 1.0
    return float(src.get("input_mult", 1.0)), float(src.get("output_mult", 1.0)) / float(src.get("mup_scale_factor", 1.0))


def adapt_telechat52b(reader: CheckpointReader) -> CanonicalModel:
    """TeleChat-52B (`TELECHAT`, GPT-2 style code with Conv1D weights and muP)."""
    where, src = str(reader.path), reader.config
    if src.get("add_bias_linear"):
        raise MtoolError(f"{where}: add_bias_linear=true is not supported (published TeleChat-52B has no biases)")
    if src.get("use_RMSNorm") is False:
        raise MtoolError(f"{where}: use_RMSNorm=false (LayerNorm) cannot be expressed as Llama")
    hidden = int(require(src, "n_embd", where))
    cfg = _canonical_config(
        src, hidden=hidden, ffn=int(require(src, "n_inner", where)),
        max_pos=src.get("n_positions") or src.get("training_seqlen") or 4096,
        theta=src.get("rotary_theta", src.get("rope_theta", 10000.0)), bias=False, where=where,
    )
    f, nh, nkv, d = cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], head_dim(cfg)
    in_mult, out_mult = _mup_factors(src)
    needed = {"transformer.wte.weight": (cfg["vocab_size"], hidden), "transformer.ln_f.weight": (hidden,)}
    if not cfg["tie_word_embeddings"]:
        needed["lm_head.weight"] = (cfg["vocab_size"], hidden)
    elif in_mult != 1.0 or out_mult != 1.0:
        raise MtoolError(f"{where}: muP factors cannot be folded into tied embeddings")
    for i in range(cfg["num_hidden_layers"]):
        s = f"transformer.h.{i}"
        needed.update({
            f"{s}.ln_1.weight": (hidden,), f"{s}.ln_2.weight": (hidden,),
            f"{s}.attn.c_attn.weight": (hidden, (nh + 2 * nkv) * d), f"{s}.attn.c_proj.weight": (nh * d, hidden),
            f"{s}.mlp.c_fc.weight": (hidden, 2 * f), f"{s}.mlp.c_proj.weight": (f, hidden),
        })
    found = {n: reader.info(n).shape for n in needed if n in reader}
    check_shapes(found, needed, where)

    def rows_of_t(canonical: str, name: str, start: int, count: int) -> LazyTensor:
        # Conv1D [in, out] -> Linear [out, in], rows [start, start+count) of the transposed matrix
        return rearranged(canonical, (count, reader.info(name).shape[0]), reader.info(name).dtype,
                          lambda: np.ascontiguousarray(reader.load_array(name)[:, start : start + count].T))

    def transposed(canonical: str, name: str) -> LazyTensor:
        return rows_of_t(canonical, name, 0, reader.info(name).shape[1])

    def scaled(canonical: str, name: str, factor: float) -> LazyTensor:
        if factor == 1.0:
            return stored(reader, name, canonical)
        dt = reader.info(name).dtype

        def load():  # arithmetic: computed in torch, rounded back to the stored type
            import torch

            return (reader.load(name).to(torch.float32) * factor).to(dt.torch)

        return LazyTensor(canonical, reader.info(name).shape, dt, load)

    t: list[LazyTensor] = [scaled("model.embed_tokens.weight", "transformer.wte.weight", in_mult)]
    for i in range(cfg["num_hidden_layers"]):
        s, c = f"transformer.h.{i}", f"model.layers.{i}"
        attn, fc = f"{s}.attn.c_attn.weight", f"{s}.mlp.c_fc.weight"
        t += [
            stored(reader, f"{s}.ln_1.weight", f"{c}.input_layernorm.weight"),
            rows_of_t(f"{c}.self_attn.q_proj.weight", attn, 0, nh * d),
            rows_of_t(f"{c}.self_attn.k_proj.weight", attn, nh * d, nkv * d),
            rows_of_t(f"{c}.self_attn.v_proj.weight", attn, (nh + nkv) * d, nkv * d),
            transposed(f"{c}.self_attn.o_proj.weight", f"{s}.attn.c_proj.weight"),
            stored(reader, f"{s}.ln_2.weight", f"{c}.post_attention_layernorm.weight"),
            rows_of_t(f"{c}.mlp.gate_proj.weight", fc, 0, f),
            rows_of_t(f"{c}.mlp.up_proj.weight", fc, f, f),
            transposed(f"{c}.mlp.down_proj.weight", f"{s}.mlp.c_proj.weight"),
        ]
    t.append(stored(reader, "transformer.ln_f.weight", "model.norm.weight"))
    if not cfg["tie_word_embeddings"]:
        t.append(scaled("lm_head.weight", "lm_head.weight", out_mult))
    notes = []
    if (in_mult, out_mult) != (1.0, 1.0):
        notes.append(f"muP folded: embeddings x {in_mult:g}, lm_head x {out_mult:g}")
    return CanonicalModel("telechat52b", LLAMA, cfg, t, reader.path, reader.path, notes=notes)
