"""The canonical checkpoint: HF Llama/Mixtral config fields + lazy tensors in HF Llama names.

Every family adapter produces one of these, and every writer consumes one, so writers
never see family quirks. Tensors are `LazyTensor`s: shape and dtype are known up
front (for planning, shape checks and disk-space checks); data is read on `load()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MtoolError


@dataclass(frozen=True)
class LazyTensor:
    """One canonical tensor; `load` reads and transforms it on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]
    synthetic: bool = False  # all zeros, made to fit the canonical form (writers may omit it)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class CanonicalModel:
    """A model normalized to HF Llama (or Mixtral) names and config fields."""

    family: str  # adapter that produced it, e.g. "llama"
    config: dict  # HF config dict with normalized fields (see `normalize_llama_config`)
    tensors: list[LazyTensor]
    tokenizer_dir: Path
    source: Path
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def n_kv_heads(self) -> int:
        return int(self.config["num_key_value_heads"])

    @property
    def hidden(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def head_dim(self) -> int:
        return int(self.config["head_dim"])

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def total_bytes(self) -> int:
        return sum(t.numel * t.dtype.itemsize for t in self.tensors)

    def n_params(self) -> int:
        return sum(t.numel for t in self.tensors)


def require(config: dict, key: str, where: str) -> object:
    """A config field that must be present, with an error naming it."""
    if key not in config or config[key] is None:
        raise MtoolError(f"{where}: config.json lacks required field '{key}'")
    return config[key]


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either transformers v4 or v5 config keys."""
    params = config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling")
    if params.get("rope_type", "default") != "default":
        scaling = params
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def normalize_llama_config(config: dict, where: str) -> dict:
    """Fill the defaults transformers would apply, so writers can read fields directly."""
    cfg = dict(config)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        require(cfg, key, where)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.setdefault("rms_norm_eps", 1e-6)
    cfg.setdefault("max_position_embeddings", 2048)
    cfg.setdefault("tie_word_embeddings", False)
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise MtoolError(
            f"{where}: num_attention_heads={cfg['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads={cfg['num_key_value_heads']}"
        )
    return cfg


def zeros(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> LazyTensor:
    """A canonical tensor the source does not have (e.g. TeleChat's absent q/k/v biases)."""
    return LazyTensor(name, shape, dtype, lambda: torch.zeros(shape, dtype=dtype), synthetic=True)


def check_shapes(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Every expected tensor present with its expected shape, named in the error if not."""
    for name, shape in expected.items():
        if name not in found:
            raise MtoolError(f"{where}: tensor {name} is missing")
        if tuple(found[name]) != tuple(shape):
            raise MtoolError(
                f"{where}: shape mismatch for {name}: checkpoint has {list(found[name])}, "
                f"config implies {list(shape)}"
            )
