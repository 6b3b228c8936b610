"""The GGUF conversions (floats, q8_0, K-quants) and `mtool quantize` run without torch.

Importing torch costs ~2 s, more than the rest of a small conversion; these paths only move
stored values through libggml. Each run here happens in a fresh interpreter in which
`import torch` fails, and must write the same bytes as the same conversion in this process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mtool.convert.gguf_export import export_gguf
from mtool.convert.gguf_requantize import requantize_gguf
from mtool.model.families import load_canonical

from .telechat_reference import write_telechat

NO_TORCH = "import sys; sys.modules['torch'] = None; from mtool.cli import main; sys.argv = ['mtool'] + sys.argv[1:]; main()"


def _mtool_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def telechat12b(tmp_path_factory):
    return write_telechat(tmp_path_factory.mktemp("tc") / "12b", "12b", seed=5)


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0", "q4_k_m"])
@pytest.mark.parametrize("model", ["llama", "mixtral", "telechat"])
def test_convert_to_gguf_without_torch(model, outtype, gqa_model, mixtral_model, telechat12b, tmp_path):
    src = {"llama": gqa_model, "mixtral": mixtral_model, "telechat": telechat12b}[model]
    out = tmp_path / "no-torch.gguf"
    r = _mtool_without_torch("convert", str(src), "-o", str(out), "--outtype", outtype, "-q")
    assert r.returncode == 0, r.stderr
    assert "torch" not in r.stderr
    ref = tmp_path / "in-process.gguf"
    export_gguf(load_canonical(src), ref, outtype=outtype, progress=False)
    assert out.read_bytes() == ref.read_bytes()


def test_quantize_gguf_without_torch(gqa_model, tmp_path):
    bf16 = tmp_path / "m-bf16.gguf"
    export_gguf(load_canonical(gqa_model), bf16, outtype="bf16", progress=False)
    out = tmp_path / "no-torch.gguf"
    r = _mtool_without_torch("quantize", str(bf16), "-o", str(out), "--outtype", "q4_k_m", "-q")
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "in-process.gguf"
    requantize_gguf(bf16, ref, "q4_k_m", progress=False)
    assert out.read_bytes() == ref.read_bytes()


def test_a_tensor_that_needs_arithmetic_names_torch(gqa_model, tmp_path):
    """Where torch is needed and missing (GPTQ), the error says so in one line, exit 2."""
    r = _mtool_without_torch("convert", str(gqa_model), "-o", str(tmp_path / "gptq"), "--to", "gptq")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "needs the Python package 'torch'" in r.stderr and "internal error" not in r.stderr
