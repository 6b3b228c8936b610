"""Shared fixtures: tiny seeded Llama checkpoints in the shapes the seed families have.

Built once per session with transformers and a tokenizer trained on the fly; nothing is
downloaded. `train_steps=30` gives realistic, peaked predictions (PPL ~60 on a 700-token
vocab) so that parity metrics are meaningful rather than comparisons of near-uniform noise.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mtool.tiny import TinySpec, make_tiny_llama  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; torch sees none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

SHAPES = {
    # MHA, tied embeddings, byte-level BPE tokenizer.json
    "mha_tied_bpe": TinySpec(tokenizer="bpe", tokenizer_vocab=800, tied=True, train_steps=30, seed=1),
    # GQA (4 heads, 2 kv heads), untied lm_head, SentencePiece: the Yi-34B / SUS-Chat shape
    "gqa_untied_spm": TinySpec(tokenizer="spm", kv_heads=2, tied=False, train_steps=30, seed=2),
    # SentencePiece with fewer pieces than embedding rows: the Ziya2-13B shape
    "ziya_padded_spm": TinySpec(tokenizer="spm", extra_rows=36, kv_heads=2, tied=False, train_steps=30, seed=3),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny_llama(root / name, spec) for name, spec in SHAPES.items()}


@pytest.fixture(scope="session")
def gqa_model(tiny_models):
    return tiny_models["gqa_untied_spm"]


HUOZI_TOKENS = ("<|beginofutterance|>", "<|endofutterance|>")
MIXTRAL_SPEC = TinySpec(tokenizer="spm", experts=8, experts_per_tok=2, kv_heads=2, tied=False,
                        added_special=HUOZI_TOKENS, train_steps=30, seed=4)


@pytest.fixture(scope="session")
def mixtral_model(tmp_path_factory):
    """Tiny Huozi-shaped Mixtral: 8 experts, top-2, SentencePiece + the two chat tokens."""
    return make_tiny_llama(tmp_path_factory.mktemp("moe") / "mixtral", MIXTRAL_SPEC)
