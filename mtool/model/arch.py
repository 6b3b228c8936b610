"""Architecture specs: what writers and engines need to know about a decoder family, as data.

One `ArchSpec` per architecture of the canonical form (Llama, Mixtral, Qwen2, ...). Writers,
the GPTQ/AWQ/imatrix engine, merge and verify read it instead of asking "is it Llama". Names
are layer-relative canonical (HF) names; `*` in a name stands for every expert of a MoE layer.
Modelled on gguf-py's MODEL_ARCH tables, GPTQModel's `module_tree` and llm-compressor's
`AWQMapping`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class AwqMapping:
    """One AWQ smoothing step: `smooth`'s output is divided by s and the input columns of the
    `balance` linears multiplied by s (exact in full precision); s is chosen by the error of
    `inspect`'s output (None: the single balance linear's own output)."""

    smooth: str
    balance: tuple[str, ...]
    inspect: str | None = None
    same_shape: bool = False  # applies only where smooth and balance have equal shapes (v -> o without GQA)


@dataclass(frozen=True)
class MoESpec:
    """Where a MoE config keeps its expert counts; expert naming itself lives in `model.experts`."""

    count_key: str = "num_local_experts"
    used_key: str = "num_experts_per_tok"


ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# HF config fields every decoder family shares (passed to transformers' config class)
COMMON_CONFIG = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
)


@dataclass(frozen=True)
class ArchSpec:
    """An architecture of the canonical form, as data."""

    name: str  # short name, e.g. "llama"
    hf_architectures: tuple[str, ...]  # config.json `architectures` entries read as this spec; [0] is written
    config_class: str  # transformers config class
    modeling: str  # transformers module holding the classes below
    decoder_layer: str
    rotary: str
    norm: str  # the final norm's class
    gguf_arch: str  # gguf-py MODEL_ARCH member
    linear_groups: tuple[tuple[str, ...], ...]  # quantized linears in true-sequential order; a group shares its input
    awq: tuple[AwqMapping, ...]
    gguf_extra: tuple[str, ...] = ()  # GGUF hparams beyond the common ones (see gguf_export.EXTRA_HPARAMS)
    permute_qk: bool = False  # llama.cpp wants q/k rows in interleaved-pair order (its NORM rope)
    config_fields: tuple[str, ...] = ()  # HF config fields beyond COMMON_CONFIG
    required_biases: tuple[str, ...] = ()  # linears that always carry a bias (Qwen2: q/k/v)
    optional_biases: tuple[str, ...] = ()  # linears that may (Llama's attention_bias / mlp_bias)
    moe: MoESpec | None = None
    native: bool = True  # transformers loads it without remote code

    @property
    def hf_class(self) -> str:
        return self.hf_architectures[0]

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.linear_groups for n in g)

    @cached_property
    def _linear_re(self) -> re.Pattern:
        return re.compile("|".join(re.escape(n).replace(r"\*", r"\d+") for n in self.linears))

    def is_quantized_linear(self, short: str) -> bool:
        """Whether a layer-relative name (without .weight) is a linear GPTQ/AWQ/imatrix handle."""
        return self._linear_re.fullmatch(short) is not None

    def shared_inputs(self) -> dict[str, tuple[str, ...]]:
        """Dense groups by the module whose input they share (first of the group); expert groups left out."""
        return {g[0]: g for g in self.linear_groups if "*" not in g[0]}
