"""Tokenizers as users bring them: SentencePiece-family models with tokenizer.json only.

- transformers v5 `save_pretrained` writes a Llama tokenizer as tokenizer.json alone (Metaspace
  pre-tokenizer, prepend_scheme "first", no tokenizer.model);
- many Hub repos of Llama-2 shape ship tokenizer.json alone with the older spelling
  (Prepend + Replace normalizer, no pre-tokenizer, "a b" merge strings, unk_token set).

Both must become a GGUF "llama" vocabulary that llama.cpp tokenizes exactly as SentencePiece
(the tokenizer the model was trained with) does, and `mtool verify` must pass them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import sentencepiece as spm
from click.testing import CliRunner
from llama_cpp import Llama

from mtool.cli import cli

TEXTS = [
    "发布工程师把模型转换成量化的检查点, then verifies it with llama.cpp.",
    "  two leading spaces and  double  spaces",
    " one leading space",
    "\ttab first\tand inside",
    "\nnewline first\nand inside\n",
    "混合 Chinese 和 English,数字 12345 与标点!",
    "emoji 🙂 and rare 龘 characters fall back to bytes",
]


@pytest.fixture(scope="module")
def sp_reference(gqa_model):
    return spm.SentencePieceProcessor(model_file=str(gqa_model / "tokenizer.model"))


def _without_sp_model(src, dst):
    shutil.copytree(src, dst)
    for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / f).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def v5_saved(gqa_model, tmp_path_factory):
    """The model with its tokenizer as transformers v5 save_pretrained writes it."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("v5") / "model"
    _without_sp_model(gqa_model, d)
    AutoTokenizer.from_pretrained(str(gqa_model)).save_pretrained(str(d))
    assert not (d / "tokenizer.model").exists()
    tj = json.loads((d / "tokenizer.json").read_text())
    assert tj["pre_tokenizer"]["type"] == "Metaspace" and tj["pre_tokenizer"]["prepend_scheme"] == "first"
    return d


@pytest.fixture(scope="module")
def hub_style(v5_saved, tmp_path_factory):
    """The same vocabulary in the Hub's Llama-2 spelling of tokenizer.json."""
    d = tmp_path_factory.mktemp("hub") / "model"
    shutil.copytree(v5_saved, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tj["pre_tokenizer"] = None
    tj["model"]["unk_token"] = "<unk>"
    tj["model"]["merges"] = [" ".join(m) for m in tj["model"]["merges"]]
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.update({"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True, "add_eos_token": False, "legacy": False})
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    return d


@pytest.fixture(scope="module")
def hub_style_shuffled(hub_style, tmp_path_factory):
    """Hub spelling with the ids of the multi-character pieces reversed: the merge order no longer
    follows the ids, so only scores derived from the merges can tokenize like SentencePiece."""
    d = tmp_path_factory.mktemp("shuf") / "model"
    shutil.copytree(hub_style, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    movable = sorted((i, p) for p, i in vocab.items() if len(p) > 1 and not p.startswith("<"))
    for (i, _), (_, p) in zip(movable, reversed(movable)):
        vocab[p] = i
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    return d


def _convert(src, out):
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "--outtype", "f32", "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    return out


def _llama_cpp_pieces(llm, gguf_path, text):
    import gguf as gg

    toks = gg.GGUFReader(str(gguf_path)).fields["tokenizer.ggml.tokens"]
    names = [bytes(toks.parts[i]).decode() for i in toks.data]
    return [names[i] for i in llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)]


@pytest.mark.parametrize("which", ["hub_style_shuffled"])
def test_merge_order_not_ids_decides(which, request, sp_reference, tmp_path):
    src = request.getfixturevalue(which)
    gguf = _convert(src, tmp_path / "m.gguf")
    llm = Llama(str(gguf), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert _llama_cpp_pieces(llm, gguf, text) == ["<s>"] + sp_reference.encode(text, out_type=str), text


@pytest.mark.parametrize("which", ["v5_saved", "hub_style"])
def test_tokenizer_json_only_matches_sentencepiece_in_llama_cpp(which, request, sp_reference, tmp_path):
    src = request.getfixturevalue(which)
    gguf = _convert(src, tmp_path / "m.gguf")
    llm = Llama(str(gguf), vocab_only=True, verbose=False)
    for text in TEXTS:
        expect = [sp_reference.bos_id()] + sp_reference.encode(text)
        got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert got == expect, (text, got[:12], expect[:12])
    # verify passes (default data), and on data that starts with a space
    r = CliRunner().invoke(cli, ["verify", str(src), str(gguf), "--ctx", "64", "--max-windows", "4", "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "identical" in r.output
    data = tmp_path / "lead.txt"
    data.write_text("   " + " ".join(TEXTS) * 4, encoding="utf-8")
    r = CliRunner().invoke(cli, ["verify", str(src), str(gguf), "--data", str(data), "--ctx", "64", "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "dummy prefix" in r.output  # transformers' divergence is named as a note, not a failure


def test_scores_follow_the_merge_order(v5_saved, tmp_path):
    """The GGUF scores are minus the rank of the first merge that makes each piece."""
    import gguf as gg

    out = _convert(v5_saved, tmp_path / "m.gguf")
    reader = gg.GGUFReader(str(out))
    toks = reader.fields["tokenizer.ggml.tokens"]
    scores = reader.fields["tokenizer.ggml.scores"]
    tokens = [bytes(toks.parts[i]).decode() for i in toks.data]
    score = {t: float(scores.parts[i][0]) for t, i in zip(tokens, scores.data)}
    merges = json.loads((v5_saved / "tokenizer.json").read_text())["model"]["merges"]
    seen = set()
    for rank, (a, b) in enumerate(merges):
        if a + b not in seen:
            assert score[a + b] == -rank, (a, b, rank)
            seen.add(a + b)
    assert reader.fields["tokenizer.ggml.model"].parts[-1].tobytes() == b"llama"


def test_sentencepiece_model_verify_with_leading_space(gqa_model, tmp_path):
    """With tokenizer.model present SentencePiece is the reference; transformers v5's dropped
    dummy prefix before a leading space is a note, and the correct GGUF passes."""
    gguf = _convert(gqa_model, tmp_path / "m.gguf")
    data = tmp_path / "lead.txt"
    data.write_text(" " + " ".join(TEXTS) * 4, encoding="utf-8")
    js = tmp_path / "v.json"
    r = CliRunner().invoke(cli, ["verify", str(gqa_model), str(gguf), "--data", str(data), "--ctx", "64",
                                 "--json", str(js), "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    rep = json.loads(js.read_text())
    assert rep["tokenization"]["reference"] == "SentencePiece" and rep["tokenization"]["match"] is True
    assert any("transformers" in n for n in rep["tokenization"]["notes"])


@pytest.mark.parametrize("which", ["v5_saved", "hub_style"])
def test_tokenizer_json_only_other_commands(which, request, tmp_path):
    """--to hf, GPTQ, merge and extend-vocab accept tokenizer.json-only SentencePiece models."""
    src = request.getfixturevalue(which)
    run = CliRunner().invoke
    r = run(cli, ["convert", str(src), "-o", str(tmp_path / "hf"), "--to", "hf", "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    r = run(cli, ["convert", str(src), "-o", str(tmp_path / "gptq"), "--to", "gptq", "--group-size", "32",
                  "--nsamples", "4", "--seqlen", "64", "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    r = run(cli, ["merge", str(src), str(tmp_path / "hf"), "-o", str(tmp_path / "merged"), "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    words = tmp_path / "w.txt"
    words.write_text("检查点\n龘龘\n", encoding="utf-8")
    r = run(cli, ["extend-vocab", str(src), "-o", str(tmp_path / "ext"), "--tokens", str(words), "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "ext"))
    for w in ("检查点", "龘龘"):
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1 or \
            tok.convert_ids_to_tokens(tok(w, add_special_tokens=False)["input_ids"]) == ["\u2581", w]
    gguf = _convert(tmp_path / "ext", tmp_path / "ext.gguf")
    r = run(cli, ["verify", str(tmp_path / "ext"), str(gguf), "--ctx", "64", "--max-windows", "4", "-q"])
    assert r.exit_code == 0, r.output + r.stderr
