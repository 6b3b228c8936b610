"""The canonical checkpoint: an architecture spec, HF config fields, lazy tensors in HF names.

Every family adapter produces one of these, and every writer consumes one, so writers
never see family quirks; what differs between architectures is data in the `ArchSpec`.
Tensors are `LazyTensor`s: shape and dtype are known up front (for planning, shape checks
and disk-space checks); data is read on `load()`. The shape tables here are the canonical
layout every adapter produces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..dtypes import DType, as_dtype, to_torch
from ..errors import MtoolError
from . import experts
from .arch import ATTENTION, DENSE_MLP, ArchSpec


@dataclass(frozen=True)
class LazyTensor:
    """One canonical tensor; `load` reads and transforms it on demand (a torch tensor).

    `array`, where the tensor is stored values moved without arithmetic (see `rearranged`),
    reads the same values as numpy storage without importing torch (see mtool.dtypes); the
    GGUF writer uses it. `dtype` may be given as a torch dtype; it is held as a DType."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    load: Callable  # () -> torch.Tensor
    synthetic: bool = False  # all zeros, made to fit the canonical form (writers may omit it)
    array: Callable[[], np.ndarray] | None = None
    # rows(start, count, out) -> rows [start, start+count) of the tensor viewed as 2-D (leading dims
    # flattened), as numpy storage, read alone (into `out`, a uint8 buffer of their size, if given):
    # for tensors stored as they are, so writers can stream a large tensor in pieces
    rows: Callable[[int, int, np.ndarray | None], np.ndarray] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", as_dtype(self.dtype))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class CanonicalModel:
    """A model normalized to one architecture spec's HF names and config fields."""

    family: str  # adapter that produced it, e.g. "llama", "telechat"
    spec: ArchSpec
    config: dict  # HF config dict with normalized fields (see `normalize_config`)
    tensors: list[LazyTensor]
    tokenizer_dir: Path
    source: Path
    notes: list[str] = field(default_factory=list)

    @property
    def moe(self) -> bool:
        return self.spec.moe is not None

    @property
    def n_experts(self) -> int:
        return int(self.config[self.spec.moe.count_key]) if self.spec.moe else 0

    @property
    def n_experts_used(self) -> int:
        return int(self.config[self.spec.moe.used_key]) if self.spec.moe else 0

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
        return head_dim(self.config)

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


def normalize_config(config: dict, where: str, spec: ArchSpec | None = None) -> dict:
    """Fill the defaults transformers would apply, so writers can read fields directly."""
    cfg = dict(config)
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    for key in required + ((spec.moe.count_key, spec.moe.used_key) if spec and spec.moe else ()):
        require(cfg, key, where)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg.get("head_dim") is None:  # left out, not filled in: GGUF writes key_length only when the source has it
        cfg.pop("head_dim", None)
    cfg.setdefault("rms_norm_eps", 1e-6)
    cfg.setdefault("max_position_embeddings", 2048)
    cfg.setdefault("tie_word_embeddings", False)
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise MtoolError(
            f"{where}: num_attention_heads={cfg['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads={cfg['num_key_value_heads']}"
        )
    return cfg


def head_dim(cfg: dict) -> int:
    """Attention head width: config's head_dim, else hidden_size / num_attention_heads."""
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def zeros(name: str, shape: tuple[int, ...], dtype) -> LazyTensor:
    """A canonical tensor the source does not have (e.g. TeleChat's absent q/k/v biases)."""
    dt = as_dtype(dtype)
    return replace(rearranged(name, shape, dt, lambda: np.zeros(shape, dt.np_storage)), synthetic=True)


def rearranged(name: str, shape: tuple[int, ...], dtype, array: Callable[[], np.ndarray],
               rows: Callable[[int, int, np.ndarray | None], np.ndarray] | None = None) -> LazyTensor:
    """A canonical tensor made from stored values by moving them only (slices, transposes,
    reshapes: no arithmetic), written once over numpy storage; the torch view comes from it.
    `rows`: its row reader, where its rows are stored rows (see LazyTensor.rows)."""
    dt = as_dtype(dtype)
    return LazyTensor(name, tuple(shape), dt, lambda: to_torch(array(), dt), array=array, rows=rows)


def stored(reader, name: str, canonical: str | None = None) -> LazyTensor:
    """A canonical tensor that is a stored tensor as it is (named `canonical` if renamed)."""
    info = reader.info(name)
    return rearranged(canonical or name, info.shape, info.dtype, lambda: reader.load_array(name),
                      rows=lambda start, count, out=None: reader.load_rows_array(name, start, count, out=out))


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


Shapes = dict[str, tuple[int, ...]]


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """[out, in] of every layer-relative dense linear of the canonical layout."""
    h, hd, nh, nkv, f = (cfg["hidden_size"], head_dim(cfg), cfg["num_attention_heads"], cfg["num_key_value_heads"],
                         cfg["intermediate_size"])
    return {"self_attn.q_proj": (nh * hd, h), "self_attn.k_proj": (nkv * hd, h), "self_attn.v_proj": (nkv * hd, h),
            "self_attn.o_proj": (h, nh * hd), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}


def _layer_shapes(spec: ArchSpec, cfg: dict, i: int) -> Shapes:
    h, lin, p = cfg["hidden_size"], linear_shapes(cfg), f"model.layers.{i}."
    shapes: Shapes = {f"{p}input_layernorm.weight": (h,)}
    for n in ATTENTION:
        shapes[f"{p}{n}.weight"] = lin[n]
        if n in spec.required_biases:
            shapes[f"{p}{n}.bias"] = lin[n][:1]
    shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    if spec.moe:  # legacy per-expert layout (see model.experts)
        f, e = cfg["intermediate_size"], int(cfg[spec.moe.count_key])
        shapes[f"{p}{experts.ROUTER}.weight"] = (e, h)
        for x in range(e):
            for w, shape in (("w1", (f, h)), ("w2", (h, f)), ("w3", (f, h))):
                shapes[f"{p}{experts.legacy(x, w)}.weight"] = shape
    else:
        shapes.update({f"{p}{n}.weight": lin[n] for n in DENSE_MLP})
    return shapes


def canonical_shapes(spec: ArchSpec, cfg: dict) -> Shapes:
    """Canonical tensor names and shapes implied by a normalized config, in write order."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    shapes: Shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        shapes.update(_layer_shapes(spec, cfg, i))
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def bias_shapes(spec: ArchSpec, cfg: dict) -> Shapes:
    """Biases a checkpoint of this spec may carry (Llama's attention_bias / mlp_bias)."""
    lin = linear_shapes(cfg)
    return {f"model.layers.{i}.{n}.bias": lin[n][:1] for i in range(cfg["num_hidden_layers"])
            for n in spec.optional_biases}


def in_layer_order(names: list[str], expected: Shapes) -> list[str]:
    """Sort names so each bias follows its weight and the tensors of a layer stay together."""
    position = {n: (i, 0) for i, n in enumerate(expected)}
    for n in names:
        if n not in position:
            position[n] = (position[n.removesuffix(".bias") + ".weight"][0], 1)
    return sorted(names, key=position.__getitem__)
