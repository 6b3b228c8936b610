"""Independent TeleChat reference: fixtures in the original layout and a plain torch forward.

No TeleChat code exists in transformers and nothing may be downloaded, so this module writes
tiny TeleChat checkpoints the way the published ones are laid out (tensor names, Conv1D
orientation, interleaved key_value, config keys with auto_map) and computes their logits
directly from those tensors, from the architecture facts alone (shared/REFERENCE.md):
pre-norm RMSNorm decoder, rotate-half RoPE, causal softmax attention, SwiGLU MLP.
It shares no code with mtool's adapters.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mtool.tiny import train_spm_tokenizer

HIDDEN, HEADS, LAYERS, FFN, VOCAB, EPS, THETA = 128, 4, 2, 256, 700, 1e-5, 10000.0
HEAD_DIM = HIDDEN // HEADS
AUTO_MAP_12B = {"AutoConfig": "configuration_telechat.TelechatConfig",
                "AutoModelForCausalLM": "modeling_telechat.TelechatForCausalLM"}
AUTO_MAP_52B = {"AutoConfig": "configuration_telechat.TelechatConfig",
                "AutoModelForCausalLM": "modeling_telechat.TelechatForCausalLM"}


def _tokenizer(out: Path) -> None:
    # TeleChat's pieces: <_start>=1, <_end>=2, chat markers right after them
    train_spm_tokenizer(out, VOCAB, specials={"bos_token": "<_start>", "eos_token": "<_end>"},
                        user_symbols=("<_pad>", "<_user>", "<_bot>", "<_system>"))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "TelechatTokenizer"
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_telechat.TelechatTokenizer", None]}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def _rand(g: torch.Generator, *shape: int, std: float = 0.08) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def _norm_w(g: torch.Generator, n: int) -> torch.Tensor:
    return 1 + 0.2 * torch.randn(n, generator=g)


def write_telechat(out: Path, variant: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """variant: '12b' (untied, transformer. prefix), '7b' (tied, no prefix) or '52b' (GPT-2 style, muP)."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    if variant in ("12b", "7b"):
        pre = "transformer." if variant == "12b" else ""
        sd[f"{pre}word_embeddings.weight"] = _rand(g, VOCAB, HIDDEN)
        for i in range(LAYERS):
            p = f"{pre}h.{i}"
            sd[f"{p}.input_layernorm.weight"] = _norm_w(g, HIDDEN)
            sd[f"{p}.self_attention.query.weight"] = _rand(g, HIDDEN, HIDDEN)
            sd[f"{p}.self_attention.key_value.weight"] = _rand(g, 2 * HIDDEN, HIDDEN)
            sd[f"{p}.self_attention.dense.weight"] = _rand(g, HIDDEN, HIDDEN)
            sd[f"{p}.self_attention.dense.bias"] = _rand(g, HIDDEN, std=0.05)
            sd[f"{p}.post_attention_layernorm.weight"] = _norm_w(g, HIDDEN)
            sd[f"{p}.mlp.gate_proj.weight"] = _rand(g, FFN, HIDDEN)
            sd[f"{p}.mlp.up_proj.weight"] = _rand(g, FFN, HIDDEN)
            sd[f"{p}.mlp.down_proj.weight"] = _rand(g, HIDDEN, FFN)
            sd[f"{p}.mlp.down_proj.bias"] = _rand(g, HIDDEN, std=0.05)
        sd[f"{pre}ln_f.weight"] = _norm_w(g, HIDDEN)
        tied = variant == "7b"
        if not tied:
            sd["lm_head.weight"] = _rand(g, VOCAB, HIDDEN)
        config = {
            "architectures": ["TelechatForCausalLM"], "model_type": "telechat", "auto_map": AUTO_MAP_12B,
            "n_layer": LAYERS, "n_head": HEADS, "hidden_size": HIDDEN, "ffn_hidden_size": FFN,
            "vocab_size": VOCAB, "layer_norm_epsilon": EPS, "training_seqlen": 512, "base_seqlen": 512,
            "tie_word_embeddings": tied, "logn": True, "embed_layernorm": False, "apply_residual_connection_post_layernorm": False,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "torch_dtype": str(dtype).removeprefix("torch."),
        }
    elif variant == "52b":
        sd["transformer.wte.weight"] = _rand(g, VOCAB, HIDDEN)
        for i in range(LAYERS):
            p = f"transformer.h.{i}"
            sd[f"{p}.ln_1.weight"] = _norm_w(g, HIDDEN)
            sd[f"{p}.attn.c_attn.weight"] = _rand(g, HIDDEN, 3 * HIDDEN)  # Conv1D: [in, out], Q|K|V
            sd[f"{p}.attn.c_proj.weight"] = _rand(g, HIDDEN, HIDDEN)
            sd[f"{p}.ln_2.weight"] = _norm_w(g, HIDDEN)
            sd[f"{p}.mlp.c_fc.weight"] = _rand(g, HIDDEN, 2 * FFN)  # gate | up
            sd[f"{p}.mlp.c_proj.weight"] = _rand(g, FFN, HIDDEN)
        sd["transformer.ln_f.weight"] = _norm_w(g, HIDDEN)
        sd["lm_head.weight"] = _rand(g, VOCAB, HIDDEN, std=0.3)
        config = {
            "architectures": ["TELECHAT"], "model_type": "telechat", "auto_map": AUTO_MAP_52B,
            "n_embd": HIDDEN, "n_head": HEADS, "n_layer": LAYERS, "n_inner": FFN, "vocab_size": VOCAB,
            "n_positions": 512, "rotary_theta": THETA, "use_RMSNorm": True, "add_bias_linear": False,
            "use_mup": True, "mup_scale_factor": 32.0, "input_mult": 1.5, "output_mult": 8.0,
            "layer_norm_epsilon": EPS, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        }
    else:
        raise ValueError(variant)
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _tokenizer(out)
    return out


# -- reference forward -----------------------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x: [heads, T, d]; rotate-half convention."""
    t = x.shape[1]
    inv = 1.0 / theta ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    ang = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    half = HEAD_DIM // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k, v: [T, H*d] -> [T, H*d]."""
    t = q.shape[0]
    q, k, v = (z.reshape(t, HEADS, HEAD_DIM).transpose(0, 1) for z in (q, k, v))
    q, k = _rope(q, THETA), _rope(k, THETA)
    scores = q @ k.transpose(1, 2) / HEAD_DIM**0.5
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(t, HEADS * HEAD_DIM)


def reference_logits(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] in float64, computed from the original checkpoint tensors."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    sd = {k: v.double() for k, v in load_file(str(Path(model_dir) / "model.safetensors")).items()}
    silu = torch.nn.functional.silu
    if cfg["architectures"] == ["TELECHAT"]:
        x = sd["transformer.wte.weight"][ids] * (cfg["input_mult"] if cfg["use_mup"] else 1.0)
        for i in range(cfg["n_layer"]):
            p = f"transformer.h.{i}"
            h = _rms(x, sd[f"{p}.ln_1.weight"])
            q, k, v = (h @ sd[f"{p}.attn.c_attn.weight"]).split(HIDDEN, dim=-1)
            x = x + _attention(q, k, v) @ sd[f"{p}.attn.c_proj.weight"]
            h = _rms(x, sd[f"{p}.ln_2.weight"])
            gate, up = (h @ sd[f"{p}.mlp.c_fc.weight"]).split(FFN, dim=-1)
            x = x + (silu(gate) * up) @ sd[f"{p}.mlp.c_proj.weight"]
        logits = _rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T
        if cfg["use_mup"]:
            logits = logits * cfg["output_mult"] / cfg["mup_scale_factor"]
        return logits
    pre = "transformer." if "transformer.word_embeddings.weight" in sd else ""
    x = sd[f"{pre}word_embeddings.weight"][ids]
    for i in range(cfg["n_layer"]):
        p = f"{pre}h.{i}"
        h = _rms(x, sd[f"{p}.input_layernorm.weight"])
        q = h @ sd[f"{p}.self_attention.query.weight"].T
        kv = (h @ sd[f"{p}.self_attention.key_value.weight"].T).reshape(len(ids), HEADS, 2, HEAD_DIM)
        k, v = kv[:, :, 0].reshape(len(ids), -1), kv[:, :, 1].reshape(len(ids), -1)
        a = _attention(q, k, v)
        x = x + a @ sd[f"{p}.self_attention.dense.weight"].T + sd[f"{p}.self_attention.dense.bias"]
        h = _rms(x, sd[f"{p}.post_attention_layernorm.weight"])
        m = silu(h @ sd[f"{p}.mlp.gate_proj.weight"].T) * (h @ sd[f"{p}.mlp.up_proj.weight"].T)
        x = x + m @ sd[f"{p}.mlp.down_proj.weight"].T + sd[f"{p}.mlp.down_proj.bias"]
    head = sd[f"{pre}word_embeddings.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    return _rms(x, sd[f"{pre}ln_f.weight"]) @ head.T
