"""Mixtral (Huozi 3.5): the MoE spec; checkpoints are read by the Llama adapter.

Canonical form is the legacy layout, one tensor per expert (see `model.experts`); the fused
layout transformers v5 saves is read expert by expert as row spans of the fused tensors.
"""

from __future__ import annotations

from ..arch import ATTENTION, COMMON_CONFIG, ArchSpec, AwqMapping, MoESpec
from .llama import ATTN_AWQ, ATTN_GROUPS

W13 = ("block_sparse_moe.experts.*.w1", "block_sparse_moe.experts.*.w3")
W2 = ("block_sparse_moe.experts.*.w2",)

MIXTRAL = ArchSpec(
    name="mixtral", hf_architectures=("MixtralForCausalLM",),
    config_class="MixtralConfig", modeling="transformers.models.mixtral.modeling_mixtral",
    decoder_layer="MixtralDecoderLayer", rotary="MixtralRotaryEmbedding", norm="MixtralRMSNorm", gguf_arch="LLAMA",
    linear_groups=ATTN_GROUPS + (W13, W2),
    # all experts' w1/w3 share the routed block's input; each expert's w3 feeds its own w2
    awq=ATTN_AWQ + (AwqMapping("post_attention_layernorm", W13, "mlp"), AwqMapping(W13[1], W2)),
    gguf_extra=("vocab_size", "rope_dimension_count"), permute_qk=True,
    config_fields=COMMON_CONFIG + ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "sliding_window"),
    optional_biases=ATTENTION, moe=MoESpec(),
)
