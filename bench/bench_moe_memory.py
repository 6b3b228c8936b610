"""Benchmark: peak memory of converting a Mixtral (Huozi-shaped) checkpoint.

Generates a bf16 MixtralForCausalLM with experts of realistic width (hidden 1024, ffn 3584,
8 experts, 4 layers, several shards), converts it to GGUF (f16, q8_0) and to HF, and checks
peak RSS against the budget of the Huozi issue: 1.5 x one layer's weights + the fixed overhead
(the RSS of a process that has imported what a conversion imports).

    python bench/bench_moe_memory.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import OUT, run_measured, write_random_shards  # noqa: E402

H, F, E, LAYERS, HEADS, KV, VOCAB = 1024, 3584, 8, 4, 8, 2, 32000


def make_moe(path: Path) -> tuple[int, int]:
    """Write the model in 4 shards; returns (total bytes, bytes of one decoder layer)."""
    from transformers import MixtralConfig

    from mtool.tiny import train_spm_tokenizer

    d = H // HEADS
    layer_shapes = {
        "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
        "self_attn.q_proj.weight": (H, H), "self_attn.k_proj.weight": (KV * d, H),
        "self_attn.v_proj.weight": (KV * d, H), "self_attn.o_proj.weight": (H, H),
        "block_sparse_moe.gate.weight": (E, H),
        **{f"block_sparse_moe.experts.{e}.{w}.weight": (F, H) if w != "w2" else (H, F) for e in range(E) for w in ("w1", "w2", "w3")},
    }
    layer_bytes = sum(2 * torch.Size(s).numel() for s in layer_shapes.values())
    if (path / "config.json").is_file():
        return sum(f.stat().st_size for f in path.glob("*.safetensors")), layer_bytes
    path.mkdir(parents=True, exist_ok=True)
    groups = [{"model.embed_tokens.weight": (VOCAB, H)}]
    groups += [{f"model.layers.{i}.{k}": s for k, s in layer_shapes.items()} for i in range(LAYERS)]
    groups[-1].update({"model.norm.weight": (H,), "lm_head.weight": (VOCAB, H)})
    shapes = {name: shape for group in groups for name, shape in group.items()}
    total = write_random_shards(path, shapes, [list(group) for group in groups])
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=F, num_hidden_layers=LAYERS,
                        num_attention_heads=HEADS, num_key_value_heads=KV, num_local_experts=E, num_experts_per_tok=2,
                        tie_word_embeddings=False, dtype="bfloat16")
    cfg.architectures = ["MixtralForCausalLM"]
    cfg.save_pretrained(str(path))
    train_spm_tokenizer(path, 700)
    return total, layer_bytes


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    src = OUT / "mixtral-4L-bf16"
    total, layer = make_moe(src)
    _, overhead, _, _ = run_measured([sys.executable, "-c",
                                   "import mtool.cli, mtool.convert.gguf_export, mtool.convert.hf_export, torch, gguf, numpy, "
                                   "transformers; from mtool.memory import return_freed_memory_promptly as r; r()"])
    budget = overhead + 1.5 * layer
    mtool = [sys.executable, "-m", "mtool.cli", "convert", str(src)]
    rows = []
    for label, args in (("gguf f16", ["-o", str(OUT / "moe-f16.gguf"), "--outtype", "f16"]),
                        ("gguf q8_0", ["-o", str(OUT / "moe-q8_0.gguf"), "--outtype", "q8_0"]),
                        ("hf (re-shard)", ["-o", str(OUT / "moe-hf"), "--to", "hf", "--split-max-size", "200M"])):
        wall, rss, code, _ = run_measured(mtool + args + ["--force", "-q"])
        rows.append((label, wall, rss, code))
    for f in OUT.glob("moe-*.gguf"):
        f.unlink()
    import shutil

    shutil.rmtree(OUT / "moe-hf", ignore_errors=True)
    print(f"\nmodel: {total / 1e6:.0f} MB bf16 in {LAYERS + 1} shards; one layer {layer / 1e6:.0f} MB; "
          f"fixed overhead {overhead / 1e6:.0f} MB; budget (overhead + 1.5 x layer) {budget / 1e6:.0f} MB")
    print(f"{'output':<16} {'wall s':>7} {'peak RSS MB':>11} {'within budget':>14}")
    for label, wall, rss, code in rows:
        status = "FAILED" if code else ("yes" if rss <= budget else "NO")
        print(f"{label:<16} {wall:>7.2f} {rss / 1e6:>11.0f} {status:>14}")


if __name__ == "__main__":
    main()
