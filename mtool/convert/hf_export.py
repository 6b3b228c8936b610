"""Canonical model -> plain HF checkpoint (LlamaForCausalLM / MixtralForCausalLM), no remote code.

For Llama and Mixtral sources this re-shards (and, for fused-expert Mixtral, re-lays) the
weights; for TeleChat it is the exact re-expression as LlamaForCausalLM that every loader
understands. The config is rebuilt with transformers' own config class, so it carries
every field transformers expects; tokenizer files are copied, with a remote-code tokenizer
class replaced by LlamaTokenizer (same SentencePiece model).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import write_hf_checkpoint
from .canonical import CanonicalModel, rope_settings

# canonical config fields passed to transformers' config classes
_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
    "num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "sliding_window",
)
# tokenizer classes transformers has itself; anything else is remote code
_NATIVE_TOKENIZERS = {"LlamaTokenizer", "LlamaTokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend"}


def hf_config(model: CanonicalModel) -> dict:
    """config.json for the canonical model, built by transformers' LlamaConfig/MixtralConfig."""
    from transformers import LlamaConfig, MixtralConfig

    cfg = model.config
    cls = MixtralConfig if cfg.get("num_local_experts") else LlamaConfig
    kwargs = {k: cfg[k] for k in _FIELDS if k in cfg and cfg[k] is not None}
    if cls is MixtralConfig:
        kwargs.pop("attention_bias", None)
        kwargs.pop("mlp_bias", None)
    theta, scaling = rope_settings(cfg)
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta} if not scaling else {**scaling, "rope_theta": theta}
    out = cls(**kwargs).to_dict()
    out["architectures"] = ["MixtralForCausalLM" if cls is MixtralConfig else "LlamaForCausalLM"]
    dtypes = {t.dtype for t in model.tensors}
    if len(dtypes) == 1:
        out["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    out.pop("auto_map", None)
    return out


def native_tokenizer_config(tok_dir: Path) -> dict | None:
    """tokenizer_config.json with a remote-code tokenizer class replaced, or None if unchanged."""
    path = Path(tok_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None
    tc = json.loads(path.read_text(encoding="utf-8"))
    if tc.get("tokenizer_class") in _NATIVE_TOKENIZERS and "auto_map" not in tc:
        return None
    tc.pop("auto_map", None)
    tc["tokenizer_class"] = "LlamaTokenizer" if (Path(tok_dir) / "tokenizer.model").is_file() else "PreTrainedTokenizerFast"
    return tc


def _apply_recipe(model: CanonicalModel, config: dict, tok_cfg: dict | None, recipe) -> tuple[dict | None, dict | None]:
    """Recipe overrides for HF outputs: chat template in tokenizer_config, eos in generation_config."""
    if recipe is None:
        return tok_cfg, None
    recipe.check_family(model.family)
    if recipe.chat_template:
        path = Path(model.tokenizer_dir) / "tokenizer_config.json"
        if tok_cfg is None:
            tok_cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        tok_cfg["chat_template"] = recipe.chat_template
    gen = None
    if recipe.eos_token:
        from .gguf_vocab import build_vocab, token_id

        eos = token_id(build_vocab(model.tokenizer_dir, model.vocab_size).tokens, recipe.eos_token, f"recipe {recipe.name}")
        gpath = Path(model.tokenizer_dir) / "generation_config.json"
        gen = json.loads(gpath.read_text(encoding="utf-8")) if gpath.is_file() else {"bos_token_id": config.get("bos_token_id")}
        gen["eos_token_id"] = eos
    return tok_cfg, gen


def export_hf(model: CanonicalModel, out: Path, *, force: bool = False, max_shard_bytes: int = 5 * 1000**3,
              progress: bool = True, recipe=None) -> Path:
    """Write `model` as a plain HF checkpoint directory at `out`."""
    config = hf_config(model)
    tok_cfg, gen_cfg = _apply_recipe(model, config, native_tokenizer_config(model.tokenizer_dir), recipe)
    return write_hf_checkpoint(
        out, config, model.tensors, max_shard_bytes=max_shard_bytes, copy_from=model.tokenizer_dir,
        tokenizer_config=tok_cfg, generation_config=gen_cfg, force=force, sources=(model.source, model.tokenizer_dir),
        progress=progress,
    )
