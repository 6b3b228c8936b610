"""Qwen2 (`Qwen2ForCausalLM`): q/k/v biases, tied or untied embeddings, NEOX rope (no q/k
permutation for llama.cpp), byte-level BPE with the Qwen2 pre-tokenizer (model.gguf_vocab).
Checkpoints are in HF names already, so the Llama adapter reads them against this spec."""

from __future__ import annotations

from ...errors import InputError
from ..arch import ATTENTION, COMMON_CONFIG, ArchSpec
from ..canonical import CanonicalModel
from ..checkpoint import CheckpointReader
from . import llama

QWEN2 = ArchSpec(
    name="qwen2", hf_architectures=("Qwen2ForCausalLM",),
    config_class="Qwen2Config", modeling="transformers.models.qwen2.modeling_qwen2",
    decoder_layer="Qwen2DecoderLayer", rotary="Qwen2RotaryEmbedding", norm="Qwen2RMSNorm", gguf_arch="QWEN2",
    linear_groups=llama.LLAMA.linear_groups, awq=llama.LLAMA.awq,
    config_fields=COMMON_CONFIG + ("use_sliding_window", "sliding_window", "max_window_layers"),
    required_biases=ATTENTION[:3],
)


def adapt(reader: CheckpointReader) -> CanonicalModel:
    if reader.config.get("use_sliding_window"):
        # transformers would window the upper layers; llama.cpp's qwen2 attends over everything
        raise InputError(f"{reader.path}/config.json: use_sliding_window=true is not supported for Qwen2")
    return llama.adapt(reader, QWEN2)
