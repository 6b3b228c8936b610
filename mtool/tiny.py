"""Tiny seeded Llama, Mixtral and Qwen2 checkpoints with tokenizers trained on the fly.

Used by `mtool demo`, the test suite and the benchmarks: nothing is downloaded, every
model is built by transformers itself from a config, and its tokenizer is trained on the
built-in bilingual text (SentencePiece like Llama/Yi/Ziya2, GPT-2 byte-level BPE, or
byte-level BPE with Qwen2's pre-tokenizer and chat tokens).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import builtin_text

SPM_SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
BPE_BOS, BPE_EOS = "<|begin_of_text|>", "<|end_of_text|>"
DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### Human: {{ m['content'] }}\n\n"
    "{% else %}### Assistant: {{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Assistant: {% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny Llama; defaults give an MHA, tied, SentencePiece model."""

    arch: str = "llama"  # "llama" | "qwen2" (experts > 0: Mixtral)
    tokenizer: str = "spm"  # "spm" | "bpe" | "qwen2"
    tokenizer_vocab: int = 700
    extra_rows: int = 0  # embedding rows beyond the tokenizer's pieces (Ziya2 case)
    hidden: int = 128
    intermediate: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None
    tied: bool = True
    max_positions: int = 512
    rope_theta: float = 10000.0
    init_std: float = 0.08  # wider than the usual 0.02 so logits are peaked and comparisons sharp
    dtype: str = "float32"
    seed: int = 0
    train_steps: int = 0  # a short AdamW run on the built-in text: peaked, realistic predictions
    experts: int = 0  # > 0: a MixtralForCausalLM with this many experts
    experts_per_tok: int = 2
    added_special: tuple[str, ...] = ()  # control tokens appended after the tokenizer's pieces
    max_shard_size: str | None = None


def _corpus_lines() -> list[str]:
    return [line for line in builtin_text().splitlines() if line.strip()]


def train_spm_tokenizer(out: Path, vocab_size: int, *, added_special: tuple[str, ...] = (),
                        specials: dict[str, str] | None = None, user_symbols: tuple[str, ...] = ()) -> None:
    """Train a Llama-style SentencePiece BPE model (byte fallback, identity normalization).

    `specials` renames the unk/bos/eos pieces (e.g. TeleChat's <_start>/<_end>); `user_symbols`
    become user-defined pieces right after them (as TeleChat's <_user>, <_bot>)."""
    import sentencepiece as spm

    names = {**SPM_SPECIALS, **(specials or {})}
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines() * 3), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, allow_whitespace_only_pieces=True,
        unk_piece=names["unk_token"], bos_piece=names["bos_token"], eos_piece=names["eos_token"],
        user_defined_symbols=list(user_symbols), num_threads=1, minloglevel=2, max_sentence_length=10000,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {
        "tokenizer_class": "LlamaTokenizer", **names,
        "add_bos_token": True, "add_eos_token": False, "chat_template": DEMO_CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    if added_special:
        # as real extended checkpoints ship them: a tokenizer.json whose added tokens follow the pieces
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out))
        tok.add_special_tokens({"additional_special_tokens": list(added_special)})
        tok.save_pretrained(str(out))


def train_bpe_tokenizer(out: Path, vocab_size: int) -> None:
    """Train a GPT-2-style byte-level BPE tokenizer.json that prepends BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_BOS, BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(_corpus_lines() * 3, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BPE_BOS} $A", pair=f"{BPE_BOS} $A {BPE_BOS} $B", special_tokens=[(BPE_BOS, tk.token_to_id(BPE_BOS))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BPE_BOS, eos_token=BPE_EOS)
    fast.chat_template = DEMO_CHAT_TEMPLATE
    fast.save_pretrained(str(out))


# Qwen2's pre-tokenizer split (its tokenizer.json) and chat tokens
QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_qwen2_tokenizer(out: Path, vocab_size: int) -> int:
    """A byte-level BPE shaped like Qwen2's: its regex split then byte-level, no BOS, ChatML tokens
    after the pieces, saved with the Hub repos' tokenizer_config (Qwen2Tokenizer class). Returns eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(_corpus_lines() * 3, trainer)
    tk.add_special_tokens(list(QWEN2_SPECIALS))
    tk.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "add_bos_token": False, "add_prefix_space": False, "chat_template": QWEN2_CHAT_TEMPLATE, "model_max_length": 32768,
           "added_tokens_decoder": {str(tk.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                             "normalized": False, "single_word": False}
                                    for t in QWEN2_SPECIALS}}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return tk.token_to_id("<|im_end|>")


def make_tiny_llama(out: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a seeded tiny LlamaForCausalLM (MixtralForCausalLM, Qwen2ForCausalLM) + tokenizer into `out`."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if spec.tokenizer == "spm":
        train_spm_tokenizer(out, spec.tokenizer_vocab, added_special=spec.added_special)
        bos, eos = 1, 2
    elif spec.tokenizer == "bpe":
        train_bpe_tokenizer(out, spec.tokenizer_vocab)
        bos, eos = 0, 1
    elif spec.tokenizer == "qwen2":
        bos, eos = None, train_qwen2_tokenizer(out, spec.tokenizer_vocab)
    else:
        raise ValueError(f"unknown tokenizer kind {spec.tokenizer!r}")
    specials = len(QWEN2_SPECIALS) if spec.tokenizer == "qwen2" else len(spec.added_special)
    vocab = spec.tokenizer_vocab + specials + spec.extra_rows
    common = dict(
        vocab_size=vocab, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads or spec.heads, max_position_embeddings=spec.max_positions,
        rms_norm_eps=1e-5, rope_theta=spec.rope_theta, tie_word_embeddings=spec.tied,
        initializer_range=spec.init_std, bos_token_id=bos, eos_token_id=eos,
    )
    torch.manual_seed(spec.seed)
    if spec.experts:
        config = MixtralConfig(num_local_experts=spec.experts, num_experts_per_tok=spec.experts_per_tok, **common)
        model = MixtralForCausalLM(config)
    elif spec.arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    with torch.no_grad():  # RMSNorm weights start at 1; jitter them so a swapped norm is visible
        for p in model.parameters():
            if p.ndim == 1:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    if spec.train_steps:
        train_on_builtin_text(model, out, spec.train_steps, seed=spec.seed)
    model = model.to(getattr(torch, spec.dtype))
    kwargs = {"max_shard_size": spec.max_shard_size} if spec.max_shard_size else {}
    model.save_pretrained(str(out), **kwargs)
    return out


def train_on_builtin_text(model, tok_dir: Path, steps: int, *, seed: int = 0, seq: int = 64, batch: int = 8) -> float:
    """Fit the model to the built-in text for `steps` AdamW steps; returns the final loss."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = torch.tensor(tok(builtin_text())["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())
