"""Bad input: one-line error, exit 2, no partial output, source untouched."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mtool.cli import cli


def _digest(d):
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def src(gqa_model, tmp_path):
    d = tmp_path / "src"
    shutil.copytree(gqa_model, d)
    return d


def _convert(src, out, *extra):
    return CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "-q", *extra])


def _assert_clean_failure(result, out, match):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert match in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if "mtool-tmp" in p.name]


def _edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def test_missing_config(src, tmp_path):
    (src / "config.json").unlink()
    _assert_clean_failure(_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "no config.json")


def test_unknown_architecture(src, tmp_path):
    _edit_config(src, architectures=["FooForCausalLM"])
    _assert_clean_failure(_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "unknown architecture 'FooForCausalLM'")


def test_truncated_safetensors(src, tmp_path):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    before = _digest(src)
    _assert_clean_failure(_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "truncated")
    assert _digest(src) == before


def test_shape_mismatch(src, tmp_path):
    _edit_config(src, intermediate_size=320)
    _assert_clean_failure(_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                          "shape mismatch for model.layers.0.mlp.gate_proj.weight")


def test_nan_in_weight_leaves_no_partial_file(src, tmp_path):
    sd = load_file(src / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")  # late tensor: header already written
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    before = _digest(src)
    _assert_clean_failure(_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                          "model.layers.1.mlp.down_proj.weight contains NaN")
    assert _digest(src) == before


def test_refuses_to_overwrite_without_force(src, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    r = _convert(src, out)
    assert r.exit_code == 2 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"precious"
    r = _convert(src, out, "--force")
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:4] == b"GGUF"


def test_output_inside_source_is_refused(src):
    out = src / "o.gguf"
    r = _convert(src, out)
    assert r.exit_code == 2 and "inside the source" in r.stderr
    assert not out.exists()


def test_missing_tensor_is_named(src, tmp_path):
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.0.self_attn.k_proj.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    _assert_clean_failure(_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf",
                          "model.layers.0.self_attn.k_proj.weight is missing")


def test_unsupported_source_dtype(src, tmp_path):
    sd = load_file(src / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].to(torch.int32)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    _assert_clean_failure(_convert(src, tmp_path / "o.gguf"), tmp_path / "o.gguf", "dtype")
