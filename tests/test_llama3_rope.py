"""Llama 3 rope scaling (`rope_type: llama3`, issue 13 item 4): written as llama.cpp expects it (a
`rope_freqs` tensor of per-frequency divisors) and verified against transformers at positions far
beyond `original_max_position_embeddings`; other rope types are refused with one line."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mtool.cli import cli
from mtool.tiny import TinySpec, make_tiny_llama

from .helpers import hf_ids, hf_logits, llamacpp_logits

ORIGINAL_CTX = 32
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL_CTX}


def _with_rope(tmp_path, name: str, rope: dict):
    src = make_tiny_llama(tmp_path / name, TinySpec(kv_heads=2, tied=False, train_steps=20, seed=21))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = rope
    cfg["max_position_embeddings"] = 1024
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory):
    return _with_rope(tmp_path_factory.mktemp("l3"), "llama3", LLAMA3)


def test_rope_freqs_are_transformers_llama3_frequencies(llama3_model, tmp_path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(cli, ["convert", str(llama3_model), "-o", str(out), "--outtype", "f32", "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    factors = np.array(tensors["rope_freqs.weight"].data, dtype=np.float64)
    cfg = AutoConfig.from_pretrained(str(llama3_model))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    base = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    # llama.cpp divides each frequency by its factor; transformers stores the divided frequencies
    np.testing.assert_allclose(base.numpy() / factors, scaled.double().numpy(), rtol=1e-5)
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()


def test_llama3_gguf_logits_match_transformers_beyond_the_original_context(llama3_model, tmp_path):
    out = tmp_path / "m.gguf"
    assert CliRunner().invoke(cli, ["convert", str(llama3_model), "-o", str(out), "--outtype", "f32", "-q"]).exit_code == 0
    from mtool.data import builtin_text

    ids = hf_ids(llama3_model, builtin_text(), limit=8 * ORIGINAL_CTX)
    assert len(ids) == 8 * ORIGINAL_CTX
    ref, ours = hf_logits(llama3_model, ids), llamacpp_logits(out, ids)
    late = slice(4 * ORIGINAL_CTX, None)  # positions 4-8x the original context
    rel = np.abs(ours[late] - ref[late]).max() / np.abs(ref[late]).max()
    assert rel < 1e-3, rel
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_the_factors_matter(llama3_model, tmp_path):
    """Guard: the same weights with plain rope give other logits past the original context."""
    from mtool.data import builtin_text

    plain = _with_rope(tmp_path, "plain", {"rope_type": "default", "rope_theta": 10000.0})
    ids = hf_ids(llama3_model, builtin_text(), limit=8 * ORIGINAL_CTX)
    a, b = hf_logits(llama3_model, ids), hf_logits(plain, ids)
    assert np.abs(a[4 * ORIGINAL_CTX:] - b[4 * ORIGINAL_CTX:]).max() > 1e-2


def test_other_rope_types_are_refused(tmp_path):
    src = _with_rope(tmp_path, "dyn", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out)])
    assert r.exit_code == 2 and "'dynamic'" in r.stderr and "llama3" in r.stderr
    assert r.stderr.count("\n") == 1 and not out.exists()
