"""Huozi 3.5 shape (Mixtral MoE): GGUF parity with transformers, fused layout, bad input."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mtool.model.families import load_canonical
from mtool.convert.gguf_export import export_gguf
from mtool.errors import MtoolError
from mtool.data import builtin_text

from .conftest import HUOZI_TOKENS
from .helpers import hf_ids, hf_logits, llamacpp_logits, mean_kld


@pytest.fixture(scope="module")
def reference(mixtral_model):
    ids = hf_ids(mixtral_model, builtin_text(), 256)
    return ids, hf_logits(mixtral_model, ids)


def test_f32_matches_transformers(mixtral_model, reference, tmp_path):
    out = tmp_path / "moe.gguf"
    export_gguf(load_canonical(mixtral_model), out, outtype="f32", progress=False)
    ids, ref = reference
    cand = llamacpp_logits(out, ids)
    rel = np.abs(ref - cand).max() / np.abs(ref).max()
    print(f"mixtral f32: max rel err {rel:.2e}")
    assert rel < 1e-3
    assert (ref.argmax(-1) == cand.argmax(-1)).all()


def test_q8_0_kld_and_layout(mixtral_model, reference, tmp_path):
    out = tmp_path / "moe-q8.gguf"
    export_gguf(load_canonical(mixtral_model), out, outtype="q8_0", progress=False)
    ids, ref = reference
    kld = mean_kld(ref, llamacpp_logits(out, ids))
    print(f"mixtral q8_0: mean KLD {kld:.2e}")
    assert kld < 5e-3
    reader = gguf.GGUFReader(str(out))
    fields = {k: f.parts[f.data[0]].tolist()[0] for k, f in reader.fields.items() if k.startswith("llama.expert")}
    assert fields == {"llama.expert_count": 8, "llama.expert_used_count": 2}
    tensors = {t.name: t for t in reader.tensors}
    for i in range(2):
        assert tensors[f"blk.{i}.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        # GGUF shapes are reversed numpy shapes: [in, out, experts]
        assert list(tensors[f"blk.{i}.ffn_gate_exps.weight"].shape) == [128, 256, 8]
        assert list(tensors[f"blk.{i}.ffn_down_exps.weight"].shape) == [256, 128, 8]
        assert tensors[f"blk.{i}.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert not any(".experts." in n for n in tensors)


def test_expert_stacking_order(mixtral_model, tmp_path):
    """ffn_gate_exps[e] is expert e's w1, ffn_down_exps[e] its w2, ffn_up_exps[e] its w3."""
    out = tmp_path / "moe.gguf"
    export_gguf(load_canonical(mixtral_model), out, outtype="f32", progress=False)
    sd = load_file(mixtral_model / "model.safetensors")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    for gname, w in (("ffn_gate_exps", "w1"), ("ffn_down_exps", "w2"), ("ffn_up_exps", "w3")):
        data = np.asarray(tensors[f"blk.1.{gname}.weight"].data)
        for e in (0, 5, 7):
            np.testing.assert_array_equal(data[e], sd[f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight"].numpy())


def _write_fused(src, dst):
    """The layout transformers v5 holds in memory: mlp.gate, experts.gate_up_proj, experts.down_proj."""
    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    out = {}
    for name, t in sd.items():
        if ".experts." not in name:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = t
    for i in range(2):
        p = f"model.layers.{i}.block_sparse_moe.experts"
        out[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{p}.{e}.w1.weight"], sd[f"{p}.{e}.w3.weight"]]) for e in range(8)])
        out[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([sd[f"{p}.{e}.w2.weight"] for e in range(8)])
    (dst / "model.safetensors").unlink()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("piece_bytes", [None, 5000])
def test_fused_layout_converts_identically(mixtral_model, tmp_path, monkeypatch, piece_bytes):
    """Also when the fused layout is read in pieces of a few rows (rows of one expert's slice of the
    fused tensor read alone; the last piece of each expert shorter)."""
    from mtool.convert import gguf_write

    fused = tmp_path / "fused"
    _write_fused(mixtral_model, fused)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(load_canonical(mixtral_model), a, outtype="f32", progress=False)
    if piece_bytes:
        monkeypatch.setattr(gguf_write, "PIECE_BYTES", piece_bytes)
    export_gguf(load_canonical(fused), b, outtype="f32", progress=False)
    ta = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(b)).tensors}
    assert ta.keys() == tb.keys()
    for k in ta:
        np.testing.assert_array_equal(ta[k], tb[k])


def test_missing_expert_is_named(mixtral_model, tmp_path):
    src = tmp_path / "broken"
    shutil.copytree(mixtral_model, src)
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.1.block_sparse_moe.experts.6.w2.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MtoolError, match=r"experts\.6\.w2\.weight is missing"):
        load_canonical(src)


def test_chat_tokens_are_control_tokens(mixtral_model, tmp_path):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    out = tmp_path / "moe.gguf"
    export_gguf(load_canonical(mixtral_model), out, outtype="f16", progress=False)
    reader = gguf.GGUFReader(str(out))
    tokens, types = reader.fields["tokenizer.ggml.tokens"], reader.fields["tokenizer.ggml.token_type"]
    for i, tok in enumerate(HUOZI_TOKENS):
        tid = 700 + i
        assert bytes(tokens.parts[tokens.data[tid]]).decode() == tok
        assert int(types.parts[types.data[tid]][0]) == gguf.TokenType.CONTROL
    text = f"{HUOZI_TOKENS[0]}用户\n你好,请介绍一下自己。{HUOZI_TOKENS[1]}\n"
    tok = AutoTokenizer.from_pretrained(str(mixtral_model))
    llm = Llama(str(out), vocab_only=True, verbose=False)
    hf = tok(text)["input_ids"]
    cpp = llm.tokenize(text.encode(), add_bos=True, special=True)
    # both parse the chat tokens as single control tokens and decode to the same text
    assert hf.count(700) == cpp.count(700) == 1 and hf.count(701) == cpp.count(701) == 1
    assert tok.decode(hf, skip_special_tokens=True).strip() == llm.detokenize(cpp).decode().strip()
    # plain text (no special tokens) tokenizes identically
    plain = builtin_text()
    assert llm.tokenize(plain.encode(), add_bos=True) == tok(plain)["input_ids"]


def test_fused_source_to_hf_is_a_loadable_legacy_checkpoint(mixtral_model, reference, tmp_path):
    from transformers import MixtralForCausalLM

    from mtool.convert.hf_export import export_hf

    fused = tmp_path / "fused"
    _write_fused(mixtral_model, fused)
    out = export_hf(load_canonical(fused), tmp_path / "hf", progress=False, max_shard_bytes=2_000_000)
    assert len(list(out.glob("*.safetensors"))) >= 2
    model = MixtralForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids, ref = reference
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double().numpy()
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
