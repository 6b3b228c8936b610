"""Canonical model -> plain HF checkpoint of its spec's class (LlamaForCausalLM, Qwen2ForCausalLM, ...).

For sources already in their spec's names this re-shards (and, for fused-expert Mixtral,
re-lays) the weights; for TeleChat it is the exact re-expression as LlamaForCausalLM that every
loader understands. The config is rebuilt with transformers' own config class, so it carries
every field transformers expects; tokenizer files are copied, with a remote-code tokenizer
class replaced by a native one over the same vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..model.canonical import CanonicalModel, rope_settings
from ..model.checkpoint import write_hf_checkpoint
from ..model.tokenizer import native_tokenizer_config
from .gguf_vocab import build_vocab, token_id


def hf_config(model: CanonicalModel) -> dict:
    """config.json for the canonical model, built by its spec's transformers config class."""
    import transformers

    cfg, spec = model.config, model.spec
    kwargs = {k: cfg[k] for k in spec.config_fields if k in cfg and cfg[k] is not None}
    theta, scaling = rope_settings(cfg)
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": theta} if not scaling else {**scaling, "rope_theta": theta}
    out = getattr(transformers, spec.config_class)(**kwargs).to_dict()
    out["architectures"] = [spec.hf_class]
    dtypes = {t.dtype for t in model.tensors}
    if len(dtypes) == 1:
        out["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    out.pop("auto_map", None)
    return out


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
