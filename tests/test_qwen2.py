"""Qwen2 through every step: GGUF (as llama.cpp's converter writes it), --to hf, GPTQ, AWQ, K-quants,
imatrix, merge, extend-vocab and verify, on tiny seeded Qwen2 models (q/k/v biases, tied and untied,
byte-level BPE with Qwen2's pre-tokenizer, ChatML tokens after the pieces, padded embedding rows)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from mtool.cli import cli
from mtool.convert.gguf_export import export_gguf
from mtool.data import builtin_text
from mtool.model.families import load_canonical
from mtool.tiny import QWEN2_SPECIALS, TinySpec, make_tiny_llama

from .helpers import hf_ids, hf_logits, llama_quantize, llamacpp_logits, same_tensors, tiny_with_bf16_gguf

SPECS = {
    # trained longer: peaked predictions, so that the 4-bit thresholds judge the quantization, not noise
    "untied": TinySpec(arch="qwen2", tokenizer="qwen2", tokenizer_vocab=800, kv_heads=2, tied=False, extra_rows=13,
                       train_steps=150, seed=11),
    "tied": TinySpec(arch="qwen2", tokenizer="qwen2", tokenizer_vocab=800, tied=True, train_steps=30, seed=12),
}
# what llama.cpp's converter (conversion/qwen.py, TextModel.set_gguf_parameters) writes for a Qwen2 without
# head_dim in its config; bench/compare_converter.py checks the whole file against the converter itself
QWEN2_HPARAMS = {"qwen2.block_count", "qwen2.context_length", "qwen2.embedding_length", "qwen2.feed_forward_length",
                 "qwen2.attention.head_count", "qwen2.attention.head_count_kv", "qwen2.rope.freq_base",
                 "qwen2.attention.layer_norm_rms_epsilon"}


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("qwen2")
    return {name: make_tiny_llama(root / name, spec) for name, spec in SPECS.items()}


def _run(*args, expect=0):
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == expect, r.output + r.stderr
    return r


def _verify(ref, cand, *extra):
    return _run("verify", ref, cand, "--ctx", "128", "--max-windows", "4", *extra)


@pytest.mark.parametrize("name", list(SPECS))
def test_gguf_logits_and_layout(name, qwen2, tmp_path):
    src = qwen2[name]
    out = tmp_path / "q.gguf"
    export_gguf(load_canonical(src), out, outtype="f32", progress=False)
    ids = hf_ids(src, builtin_text())[:200]
    ref, got = hf_logits(src, ids), llamacpp_logits(out, ids)
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    assert rel < 1e-3, rel
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    r = gguf.GGUFReader(out)
    assert r.fields["general.architecture"].contents() == "qwen2"
    keys = {k for k in r.fields if k.startswith("qwen2.")}
    assert keys == QWEN2_HPARAMS
    names = {t.name for t in r.tensors}
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    assert "blk.0.attn_output.bias" not in names
    assert ("output.weight" in names) == (name == "untied")
    assert r.fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert "tokenizer.ggml.scores" not in r.fields  # as the converter writes a byte-level BPE vocab
    # q/k rows are not permuted for qwen2 (NEOX rope): the GGUF holds the checkpoint's rows as they are
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight").numpy()
    t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    np.testing.assert_array_equal(np.array(t.data).reshape(q.shape), q)


def test_chat_tokens_and_chinese_tokenize_as_hf(qwen2, tmp_path):
    from llama_cpp import Llama

    src = qwen2["untied"]
    out = tmp_path / "q.gguf"
    export_gguf(load_canonical(src), out, outtype="f16", progress=False)
    text = "<|im_start|>user\n发布工程师把模型转换成量化的检查点 and runs it.<|im_end|>\n"
    hf = AutoTokenizer.from_pretrained(str(src))(text)["input_ids"]
    llm = Llama(str(out), n_ctx=64, verbose=False, vocab_only=True)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf
    assert llm.token_eos() == hf[-2] == AutoTokenizer.from_pretrained(str(src)).convert_tokens_to_ids("<|im_end|>")
    assert hf[0] == 800 + QWEN2_SPECIALS.index("<|im_start|>")  # chat tokens follow the pieces, as in Qwen2


def test_to_hf_is_qwen2_and_exact(qwen2, tmp_path):
    src = qwen2["untied"]
    out = tmp_path / "hf"
    _run("convert", src, "-o", out, "--to", "hf", "-q")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["model_type"] == "qwen2"
    ids = hf_ids(src, builtin_text())[:64]
    np.testing.assert_array_equal(hf_logits(out, ids), hf_logits(src, ids))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_gptq_awq_keep_biases_and_verify(method, qwen2, tmp_path):
    src = qwen2["untied"]
    out = tmp_path / method
    _run("convert", src, "-o", out, "--to", method, "--bits", "4", "--group-size", "32", "--nsamples", "14",
         "--seqlen", "128", "-q")
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        names = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.qweight" in names
        bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        src_bias = f.get_tensor("model.layers.0.self_attn.q_proj.bias")
    if method == "gptq":  # AWQ folds scales into v's rows and bias when v -> o applies (no GQA); here GQA
        torch.testing.assert_close(bias.float(), src_bias.float(), atol=1e-3, rtol=1e-3)
    _verify(src, out)  # the 4-bit thresholds


def test_kquant_bytes_equal_llama_quantize(tmp_path):
    """One pass from the bf16 checkpoint == llama-quantize of its bf16 GGUF, tensor for tensor."""
    spec = TinySpec(arch="qwen2", tokenizer="qwen2", tokenizer_vocab=800, extra_rows=13, hidden=256, intermediate=512,
                    kv_heads=2, tied=False, dtype="bfloat16", seed=14)
    src, bf16 = tiny_with_bf16_gguf(tmp_path, "q2", spec)
    ours = tmp_path / "q4km.gguf"
    export_gguf(load_canonical(src), ours, outtype="q4_k_m", progress=False)
    same_tensors(ours, llama_quantize(bf16, tmp_path / "ref.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M))


def test_imatrix_names_follow_the_spec(qwen2, tmp_path):
    src = qwen2["tied"]
    out = tmp_path / "im.gguf"
    _run("imatrix", src, "-o", out, "--nsamples", "4", "--seqlen", "64", "-q")
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert {"blk.0.attn_q.weight.in_sum2", "blk.0.attn_v.weight.in_sum2", "blk.1.ffn_down.weight.in_sum2"} <= names


def test_merge_and_extend_vocab_convert_and_verify(qwen2, tmp_path):
    a = qwen2["untied"]
    b = make_tiny_llama(tmp_path / "b", TinySpec(**{**SPECS["untied"].__dict__, "seed": 13}))
    merged = tmp_path / "merged"
    _run("merge", a, b, "-o", merged, "--method", "linear", "-q")
    m = AutoModelForCausalLM.from_pretrained(str(merged))
    assert type(m).__name__ == "Qwen2ForCausalLM"
    _run("convert", merged, "-o", tmp_path / "m.gguf", "--outtype", "q8_0", "-q")
    _verify(merged, tmp_path / "m.gguf")

    words = tmp_path / "words.txt"
    words.write_text("模型\n转换\n检查点\n发布工程师\n", encoding="utf-8")
    ext = tmp_path / "ext"
    _run("extend-vocab", a, "-o", ext, "--tokens", words, "-q")
    tok = AutoTokenizer.from_pretrained(str(ext))
    assert "发布工程师" in [tok.convert_tokens_to_string([p]) for p in tok.tokenize("发布工程师")]
    _run("convert", ext, "-o", tmp_path / "e.gguf", "--outtype", "f16", "-q")
    _verify(ext, tmp_path / "e.gguf")
