"""mtool extend-vocab on tiny SentencePiece and BPE Llamas and the Huozi-shaped Mixtral."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner
from llama_cpp import Llama
from safetensors.torch import load_file
from sentencepiece import sentencepiece_model_pb2 as pb
from transformers import AutoTokenizer

from mtool.cli import cli
from mtool.model.families import load_canonical
from mtool.convert.gguf_export import export_gguf

from .conftest import HUOZI_TOKENS
from .helpers import hf_logits

WORDS = ["模型", "转换", "分词器", "困惑度", "检查点", "发布工程师", "词元", "混合专家模型", "量化", "转换"]
ZH = "发布工程师把模型转换成量化的检查点,再用困惑度和词元检查分词器。混合专家模型也一样。"
EN = "A release engineer turns a trained checkpoint into artifacts that people can download and run."


def _extend(src, out, *args, expect=0):
    r = CliRunner().invoke(cli, ["extend-vocab", str(src), "-o", str(out), "-q", *map(str, args)])
    assert r.exit_code == expect, r.output + r.stderr
    return r


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    f = tmp_path_factory.mktemp("words") / "words.txt"
    f.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def extended(gqa_model, words, tmp_path_factory):
    out = tmp_path_factory.mktemp("ext") / "ext"
    r = _extend(gqa_model, out, "--tokens", words)
    assert "skipped 1 duplicate(s): 转换" in r.output
    return out


def _rows(d):
    sd = load_file(str(d / "model.safetensors"))
    return sd["model.embed_tokens.weight"].float(), sd["lm_head.weight"].float()


def test_fewer_tokens_and_exact_round_trip(gqa_model, extended):
    old, new = AutoTokenizer.from_pretrained(str(gqa_model)), AutoTokenizer.from_pretrained(str(extended))
    a, b = old(ZH)["input_ids"], new(ZH)["input_ids"]
    print(f"tokens: {len(a)} -> {len(b)}")
    assert len(b) < 0.7 * len(a)
    assert new.decode(b, skip_special_tokens=True) == ZH
    pieces = new.convert_ids_to_tokens(b)
    assert "发布工程师" in pieces and "混合专家模型" in pieces
    assert json.loads((extended / "config.json").read_text())["vocab_size"] == len(new)


def test_logits_of_old_text_unchanged(gqa_model, extended):
    ids = AutoTokenizer.from_pretrained(str(extended))(EN)["input_ids"]
    assert max(ids) < 700  # the text uses no new token
    before, after = hf_logits(gqa_model, ids), hf_logits(extended, ids)
    assert after.shape[1] > before.shape[1]
    np.testing.assert_allclose(after[:, :700], before, rtol=0, atol=1e-5)


def test_new_rows_are_subword_means(gqa_model, extended):
    proto = pb.ModelProto()
    proto.ParseFromString((gqa_model / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    old_sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    new_sp = spm.SentencePieceProcessor(model_file=str(extended / "tokenizer.model"))
    emb0, head0 = _rows(gqa_model)
    emb1, head1 = _rows(extended)
    assert torch.equal(emb1[:700], emb0) and torch.equal(head1[:700], head0)
    checked = 0
    for i in range(700, new_sp.get_piece_size()):
        split = old_sp.encode(new_sp.id_to_piece(i), out_type=int)
        assert len(split) >= 2
        torch.testing.assert_close(emb1[i], emb0[split].mean(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(head1[i], head0[split].mean(0), rtol=1e-6, atol=1e-7)
        checked += 1
    assert checked >= 8


def test_extended_model_converts_and_llamacpp_tokenizes_like_hf(extended, tmp_path):
    out = tmp_path / "ext.gguf"
    export_gguf(load_canonical(extended), out, outtype="f16", progress=False)
    tok = AutoTokenizer.from_pretrained(str(extended))
    llm = Llama(str(out), vocab_only=True, verbose=False)
    assert llm.n_vocab() == len(tok)
    for text in (ZH, ZH + "\n" + EN):
        assert llm.tokenize(text.encode(), add_bos=True) == tok(text)["input_ids"]


def test_bpe_tokenizer_gets_vocab_and_merges(tiny_models, words, tmp_path):
    src = tiny_models["mha_tied_bpe"]
    out = tmp_path / "bpe"
    _extend(src, out, "--tokens", words, "--special", "<|im_end|>")
    old, new = AutoTokenizer.from_pretrained(str(src)), AutoTokenizer.from_pretrained(str(out))
    word = "混合专家模型"
    assert len(new(word, add_special_tokens=False)["input_ids"]) == 1 < len(old(word, add_special_tokens=False)["input_ids"])
    assert new.decode(new(ZH)["input_ids"], skip_special_tokens=True) == ZH
    im_end = new.convert_tokens_to_ids("<|im_end|>")
    assert im_end == len(new) - 1
    emb0, emb1 = (load_file(str(d / "model.safetensors"))["model.embed_tokens.weight"] for d in (src, out))
    assert torch.equal(emb1[: emb0.shape[0]], emb0)  # tied: only the embedding grows
    g = tmp_path / "bpe.gguf"
    export_gguf(load_canonical(out), g, outtype="f16", progress=False)
    llm = Llama(str(g), vocab_only=True, verbose=False)
    assert llm.tokenize(ZH.encode(), add_bos=True) == new(ZH)["input_ids"]
    types = gguf.GGUFReader(str(g)).fields["tokenizer.ggml.token_type"]
    assert int(types.parts[types.data[im_end]][0]) == gguf.TokenType.CONTROL


def test_added_chat_tokens_move_after_new_pieces(mixtral_model, words, tmp_path):
    out = tmp_path / "huozi"
    _extend(mixtral_model, out, "--tokens", words, "--pad-to-multiple-of", "64")
    old, new = AutoTokenizer.from_pretrained(str(mixtral_model)), AutoTokenizer.from_pretrained(str(out))
    sd0, sd1 = load_file(str(mixtral_model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    n_cfg = json.loads((out / "config.json").read_text())["vocab_size"]
    assert n_cfg % 64 == 0 and sd1["model.embed_tokens.weight"].shape[0] == n_cfg
    for t in HUOZI_TOKENS:
        i0, i1 = old.convert_tokens_to_ids(t), new.convert_tokens_to_ids(t)
        assert i1 > i0  # moved after the new pieces, with its row
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(sd1[k][i1], sd0[k][i0])
    g = tmp_path / "h.gguf"
    res = export_gguf(load_canonical(out), g, outtype="f16", progress=False)
    assert any("padding rows" in n for n in res.notes)
    llm = Llama(str(g), vocab_only=True, verbose=False)
    assert llm.tokenize(ZH.encode(), add_bos=True) == new(ZH)["input_ids"]


def test_bad_input(gqa_model, words, tmp_path):
    out = tmp_path / "o"
    r = _extend(gqa_model, out, expect=2)
    assert "--tokens or --sp-model" in r.stderr
    existing = tmp_path / "existing.txt"
    existing.write_text("模型\n", encoding="utf-8")
    r = _extend(gqa_model, out, "--tokens", existing, expect=2)
    assert "nothing to add" in r.stderr and not out.exists()
    r = _extend(gqa_model, gqa_model / "inside", "--tokens", words, expect=2)
    assert "inside the source" in r.stderr
    r = _extend(gqa_model, out, "--tokens", tmp_path / "missing.txt", expect=2)
    assert "not found" in r.stderr
    assert not [p for p in tmp_path.iterdir() if "mtool" in p.name]


def test_sp_model_merge(gqa_model, tmp_path):
    """--sp-model merges the normal pieces of another SentencePiece model (Chinese-LLaMA style)."""
    corpus = tmp_path / "zh.txt"
    corpus.write_text((ZH + "\n") * 50, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "zh"), vocab_size=60, model_type="bpe",
                                   character_coverage=1.0, minloglevel=2)
    out = tmp_path / "merged"
    r = _extend(gqa_model, out, "--sp-model", tmp_path / "zh.model")
    assert "tokens added" in r.output
    old, new = AutoTokenizer.from_pretrained(str(gqa_model)), AutoTokenizer.from_pretrained(str(out))
    assert len(new(ZH)["input_ids"]) < len(old(ZH)["input_ids"])
    assert new.decode(new(ZH)["input_ids"], skip_special_tokens=True) == ZH


# words whose characters the tiny vocabulary (trained on the built-in text) lacks
UNSEEN = ["饕餮", "魑魅魍魉", "鑫淼", "龘", "饕餮盛宴"]


def test_unseen_characters_become_reachable(gqa_model, tmp_path):
    """Chinese-LLaMA-style extension: characters the old vocabulary lacks become pieces, each new
    word is one token in running text, decodes exactly, and HF, SentencePiece and llama.cpp agree."""
    old_sp = spm.SentencePieceProcessor(model_file=str(gqa_model / "tokenizer.model"))
    old_pieces = {old_sp.id_to_piece(i) for i in range(old_sp.vocab_size())}
    assert not {c for w in UNSEEN for c in w} & old_pieces  # precondition: all characters unseen
    words = tmp_path / "w.txt"
    words.write_text("\n".join(UNSEEN) + "\n", encoding="utf-8")
    out = tmp_path / "ext"
    r = _extend(gqa_model, out, "--tokens", words)
    assert "characters the old vocabulary lacked" in r.output
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert not [p for p in pieces if "<0x" in p and not (p.startswith("<0x") and len(p) == 6)]
    tok = AutoTokenizer.from_pretrained(str(out))
    for w in UNSEEN:
        assert w in pieces
        running = "前" + w  # in running text: no dummy prefix before the word
        ids = sp.encode(running)
        assert sp.id_to_piece(ids[-1]) == w, (w, [sp.id_to_piece(i) for i in ids])
        hf_ids = tok(running, add_special_tokens=False)["input_ids"]
        assert hf_ids == ids
        assert tok.decode(tok(w, add_special_tokens=False)["input_ids"]) == w
    text = "在宴会上," + "饕餮盛宴里有魑魅魍魉,鑫淼说龘。" * 3 + ZH
    res = export_gguf(load_canonical(out), tmp_path / "ext.gguf", outtype="f32", progress=False)
    llm = Llama(str(res.files[0]), vocab_only=True, verbose=False)
    cpp = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    assert cpp == [sp.bos_id()] + sp.encode(text) == tok(text)["input_ids"]
    r = CliRunner().invoke(cli, ["verify", str(out), str(res.files[0]), "--ctx", "64", "--max-windows", "4", "-q"])
    assert r.exit_code == 0, r.output + r.stderr


@pytest.mark.parametrize("content, match", [
    ("x" * 5000 + "\n", "longer than 32"),
    ("good\nbad\x07bell\n", "control character U+0007"),
    ("\n\n  \n", "holds no tokens"),
])
def test_tokens_file_is_validated(gqa_model, tmp_path, content, match):
    f = tmp_path / "t.txt"
    f.write_text(content, encoding="utf-8")
    r = _extend(gqa_model, tmp_path / "o", "--tokens", f, expect=2)
    assert match in r.stderr and r.stderr.startswith("error: ") and not (tmp_path / "o").exists()


def test_binary_tokens_file(gqa_model, tmp_path):
    f = tmp_path / "t.bin"
    f.write_bytes(b"\xff\xfe\x00\x01binary")
    r = _extend(gqa_model, tmp_path / "o", "--tokens", f, expect=2)
    assert "not UTF-8" in r.stderr
