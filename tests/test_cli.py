"""The CLI end to end: convert, verify (pass and fail), inspect, demo, help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mtool.cli import cli


@pytest.fixture(scope="module")
def q8(gqa_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "m-q8_0.gguf"
    r = CliRunner().invoke(cli, ["convert", str(gqa_model), "-o", str(out), "--outtype", "q8_0", "-q"])
    assert r.exit_code == 0, r.output
    assert "wrote 1 file(s)" in r.output
    return out


def test_verify_passes_and_writes_json(gqa_model, q8, tmp_path):
    js = tmp_path / "v.json"
    r = CliRunner().invoke(cli, ["verify", str(gqa_model), str(q8), "--json", str(js), "--ctx", "128"])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output
    rep = json.loads(js.read_text())
    assert rep["passed"] and rep["artifact_type"] == "q8_0"
    assert rep["tokenization"]["match"] is True
    m = rep["metrics"]
    assert 0 < m["kld_mean"] < 5e-3 and m["top1_agreement"] > 0.9 and m["positions"] > 500


def test_verify_fails_past_threshold(gqa_model, q8, tmp_path):
    js = tmp_path / "v.json"
    r = CliRunner().invoke(cli, ["verify", str(gqa_model), str(q8), "--max-kld", "1e-9", "--json", str(js)])
    assert r.exit_code == 1
    assert "FAIL" in r.output and "mean KLD" in r.output
    assert json.loads(js.read_text())["passed"] is False


def test_verify_catches_a_broken_vocab(gqa_model, q8, tmp_path):
    """A GGUF whose tokenizer does not match the reference fails the tokenization check."""
    other = tmp_path / "other"
    from mtool.tiny import TinySpec, make_tiny_llama

    make_tiny_llama(other, TinySpec(kv_heads=2, tied=False, tokenizer_vocab=700, seed=9))
    # same shapes and names, but a BPE tokenizer that splits text differently
    bpe = tmp_path / "bpe"
    make_tiny_llama(bpe, TinySpec(tokenizer="bpe", tokenizer_vocab=700, kv_heads=2, tied=False, seed=9))
    out = tmp_path / "bpe.gguf"
    assert CliRunner().invoke(cli, ["convert", str(bpe), "-o", str(out), "-q"]).exit_code == 0
    r = CliRunner().invoke(cli, ["verify", str(other), str(out)])
    assert r.exit_code == 1
    assert "tokenization differs" in r.output


def test_verify_hf_candidate(gqa_model):
    r = CliRunner().invoke(cli, ["verify", str(gqa_model), str(gqa_model), "--ctx", "64", "--max-windows", "2"])
    assert r.exit_code == 0, r.output
    assert "mean KLD               0.000e+00" in r.output


def test_inspect_gguf_and_hf(gqa_model, q8):
    r = CliRunner().invoke(cli, ["inspect", str(q8), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["architecture"] == "llama" and s["vocab_size"] == 700 and s["file_type"] == "q8_0"
    assert s["tensor_types"]["Q8_0"] == 2 * 7 + 2 and s["tensor_types"]["F32"] == 5
    assert isinstance(s["parameters"], int) and isinstance(s["size_mb"], float)
    assert s["metadata"]["llama.attention.head_count_kv"] == 2
    r = CliRunner().invoke(cli, ["inspect", str(gqa_model)])
    assert r.exit_code == 0 and "LlamaForCausalLM" in r.output and "sentencepiece" in r.output


def test_convert_needs_a_format(gqa_model, tmp_path):
    r = CliRunner().invoke(cli, ["convert", str(gqa_model), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--to" in r.stderr


def test_console_script_demo_and_help(tmp_path):
    exe = [sys.executable, "-m", "mtool.cli"]
    h = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert h.returncode == 0
    for cmd in ("convert", "quantize", "verify", "inspect", "demo"):
        assert cmd in h.stdout
    d = subprocess.run(exe + ["demo", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert d.returncode == 0, d.stderr[-2000:]
    assert d.stdout.count("PASS") == 2
    assert (tmp_path / "tiny-llama-q8_0.gguf").is_file()
