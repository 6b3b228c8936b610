"""llama.cpp logits of our GGUF vs transformers logits of the source, for every tiny shape."""

from __future__ import annotations

import numpy as np
import pytest

from mtool.model.families import load_canonical
from mtool.convert.gguf_export import export_gguf
from mtool.data import builtin_text

from .helpers import hf_ids, hf_logits, llamacpp_logits, mean_kld

SHAPE_NAMES = ["mha_tied_bpe", "gqa_untied_spm", "ziya_padded_spm"]
# acceptance thresholds of the foundation issue
MAX_KLD = {"f16": 1e-4, "bf16": 1e-4, "q8_0": 5e-3, "q4_0": 5e-2}


@pytest.fixture(scope="module")
def reference(tiny_models):
    out = {}
    for name in SHAPE_NAMES:
        ids = hf_ids(tiny_models[name], builtin_text(), limit=256)
        out[name] = (ids, hf_logits(tiny_models[name], ids))
    return out


@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_f32_matches_transformers(shape, tiny_models, reference, tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(load_canonical(tiny_models[shape]), out, outtype="f32", progress=False)
    ids, ref = reference[shape]
    cand = llamacpp_logits(out, ids)
    rel = np.abs(ref - cand).max() / np.abs(ref).max()
    top1 = (ref.argmax(-1) == cand.argmax(-1)).mean()
    print(f"{shape} f32: max rel err {rel:.2e}, top-1 {top1:.4f}")
    assert rel < 1e-3
    assert top1 == 1.0


@pytest.mark.parametrize("outtype", list(MAX_KLD))
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_quantized_kld(shape, outtype, tiny_models, reference, tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(load_canonical(tiny_models[shape]), out, outtype=outtype, progress=False)
    ids, ref = reference[shape]
    kld = mean_kld(ref, llamacpp_logits(out, ids))
    print(f"{shape} {outtype}: mean KLD {kld:.3e}")
    assert kld < MAX_KLD[outtype]


def test_quantization_is_visible(tiny_models, reference, tmp_path):
    """The KLD checks can fail: q4_0 must cost clearly more than q8_0, and q8_0 more than f16."""
    shape = "gqa_untied_spm"
    ids, ref = reference[shape]
    klds = {}
    for outtype in ("f16", "q8_0", "q4_0"):
        out = tmp_path / f"{outtype}.gguf"
        export_gguf(load_canonical(tiny_models[shape]), out, outtype=outtype, progress=False)
        klds[outtype] = mean_kld(ref, llamacpp_logits(out, ids))
    assert klds["f16"] * 10 < klds["q8_0"] and klds["q8_0"] * 10 < klds["q4_0"]


def test_q_k_unpermutation_matters(tiny_models, reference, tmp_path, monkeypatch):
    """Without the rotary un-permutation llama.cpp computes different logits: parity would fail."""
    from mtool.convert import gguf_export

    monkeypatch.setattr(gguf_export, "_transform", lambda model, name, t: t)
    out = tmp_path / "broken.gguf"
    export_gguf(load_canonical(tiny_models["gqa_untied_spm"]), out, outtype="f32", progress=False)
    ids, ref = reference["gqa_untied_spm"]
    assert mean_kld(ref, llamacpp_logits(out, ids)) > 1e-3


def test_padded_vocab_keeps_every_row(tiny_models, tmp_path):
    import gguf

    out = tmp_path / "z.gguf"
    model = load_canonical(tiny_models["ziya_padded_spm"])
    res = export_gguf(model, out, outtype="f16", progress=False)
    reader = gguf.GGUFReader(str(out))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"]
    assert len(tokens.data) == model.vocab_size == 736
    last = bytes(tokens.parts[tokens.data[-1]]).decode()
    assert last == "[PAD735]"
    assert int(types.parts[types.data[-1]][0]) == gguf.TokenType.UNUSED
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert list(emb.shape) == [128, 736]
    assert any("padding rows" in n for n in res.notes)
