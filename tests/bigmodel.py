"""A random-weight Llama of a few hundred MB, written directly with safetensors (seconds), for
tests that need a conversion which runs long enough to be interrupted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_slow_llama(out: Path, tokenizer_from: Path, *, hidden: int = 512, intermediate: int = 1536,
                    layers: int = 8, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        if (tokenizer_from / f).is_file():
            shutil.copy2(tokenizer_from / f, out / f)
    cfg = json.loads((tokenizer_from / "config.json").read_text())
    vocab = cfg["vocab_size"]
    cfg.update(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8, tie_word_embeddings=False)
    (out / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    kv = hidden // 2
    sd = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g) * 0.02,
          "lm_head.weight": torch.randn(vocab, hidden, generator=g) * 0.02, "model.norm.weight": torch.ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (kv, hidden)),
                         ("self_attn.v_proj", (kv, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                         ("mlp.gate_proj", (intermediate, hidden)), ("mlp.up_proj", (intermediate, hidden)),
                         ("mlp.down_proj", (hidden, intermediate))):
            sd[p + n + ".weight"] = torch.randn(*shape, generator=g) * 0.02
        sd[p + "input_layernorm.weight"] = torch.ones(hidden)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
