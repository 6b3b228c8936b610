"""The layer-streamed reference (verify --reference streamed) against the whole-model path."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mtool.verify.streamed as streamed_mod
from mtool.cli import cli
from mtool.convert.gguf_export import export_gguf
from mtool.data import builtin_text
from mtool.model.families import load_canonical
from mtool.tiny import TinySpec, make_tiny_llama
from mtool.verify.report import canonical_reference
from mtool.verify.runners import HFRunner
from mtool.verify.streamed import StreamedRunner

from .helpers import hf_ids
from .telechat_reference import write_telechat


def _log_probs(x: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(x).double(), -1).numpy()


def _windows(ids: list[int]) -> list[list[int]]:
    # three lengths, so windows of one length run together and the odd one alone
    return [ids[:48], ids[48:96], ids[96:120], ids[120:168]]


def _compare(ref_dir, tok_dir):
    windows = _windows(hf_ids(tok_dir, builtin_text(), limit=400))
    with canonical_reference(load_canonical(ref_dir)) as d:
        whole = HFRunner(d, "cpu")
    got = list(StreamedRunner(load_canonical(ref_dir), "cpu", batch=2).iter_logits(windows))
    assert len(got) == len(windows)
    for w, g in zip(windows, got):
        assert g.shape == (len(w), whole.vocab_size)
        # f32 sums in another order (MoE batches group other tokens): 1e-6 relative, as the parity bar
        np.testing.assert_allclose(_log_probs(g), _log_probs(whole.logits(w)), rtol=1e-6, atol=1e-6)


def test_llama_streamed_equals_whole(gqa_model):
    _compare(gqa_model, gqa_model)


def test_mixtral_streamed_equals_whole(mixtral_model):
    _compare(mixtral_model, mixtral_model)


def test_telechat_streamed_equals_whole_without_a_copy(tmp_path, monkeypatch):
    src = write_telechat(tmp_path / "tc", "12b", seed=3)
    with canonical_reference(load_canonical(src)) as d:  # the whole path writes a canonical copy; the tokenizer is the same
        _compare(src, d)
    import mtool.verify.report as report

    def no_copy(*a, **k):
        raise AssertionError("the streamed reference must not write a canonical copy")

    gg = tmp_path / "tc.gguf"
    export_gguf(load_canonical(src), gg, outtype="f32", progress=False)
    monkeypatch.setattr(report, "export_hf", no_copy)
    r = CliRunner().invoke(cli, ["verify", str(src), str(gg), "--reference", "streamed", "--ctx", "64",
                                 "--max-windows", "4", "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "layer by layer" in r.output


def _max_layers_alive(model_dir, monkeypatch) -> int:
    """Most decoder layers alive at once while the streamed runner works."""
    alive: list[weakref.ref] = []
    peak = 0
    real = streamed_mod.build_layer

    def tracked(*args, **kwargs):
        nonlocal peak
        gc.collect()
        layer = real(*args, **kwargs)
        alive.append(weakref.ref(layer))
        peak = max(peak, sum(r() is not None for r in alive))
        return layer

    monkeypatch.setattr(streamed_mod, "build_layer", tracked)
    ids = hf_ids(model_dir, builtin_text(), limit=200)
    list(StreamedRunner(load_canonical(model_dir), "cpu").iter_logits([ids[:64], ids[64:128]]))
    return peak


@pytest.mark.parametrize("layers", [2, 6])
def test_one_layer_held_whatever_the_depth(layers, tmp_path, monkeypatch):
    src = make_tiny_llama(tmp_path / f"l{layers}", TinySpec(layers=layers, seed=5))
    assert _max_layers_alive(src, monkeypatch) == 1


@pytest.mark.parametrize("method,naming", [("gptq", "legacy"), ("awq", "gptqmodel")])
def test_quantized_candidate_streamed_equals_whole(method, naming, mixtral_model, tmp_path):
    """A GPTQ/AWQ candidate dequantized layer by layer computes what the whole dequantized model does
    (the MoE case, with GPTQModel's expert names), and verify reports the same figures either way."""
    from mtool.verify.quantized import QuantizedRunner, dequantized_model

    out = tmp_path / method
    r = CliRunner().invoke(cli, ["convert", str(mixtral_model), "-o", str(out), "--to", method, "--group-size", "32",
                                 "--nsamples", "4", "--seqlen", "64", "--expert-naming", naming, "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    windows = _windows(hf_ids(mixtral_model, builtin_text(), limit=400))
    whole = QuantizedRunner(out, "cpu")
    got = list(StreamedRunner(dequantized_model(out), "cpu").iter_logits(windows))
    for w, g in zip(windows, got):
        np.testing.assert_allclose(_log_probs(g), _log_probs(whole.logits(w)), rtol=1e-6, atol=1e-6)
    figures = []
    for mode in ("whole", "streamed"):
        r = CliRunner().invoke(cli, ["verify", str(mixtral_model), str(out), "--reference", mode, "--ctx", "128",
                                     "--max-windows", "3", "--max-kld", "10", "--min-top1", "0", "--max-ppl-ratio",
                                     "10", "-q"])
        assert r.exit_code == 0, r.output + r.stderr
        figures.append([line.split()[2] for line in r.output.splitlines() if line.startswith(("mean KLD", "PPL ratio"))])
    assert figures[0] == figures[1]


@pytest.mark.cuda
def test_streamed_on_cuda_equals_cpu(mixtral_model, monkeypatch):
    """Layers streamed to the GPU compute what they compute on the CPU (float32, no TF32)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    windows = _windows(hf_ids(mixtral_model, builtin_text(), limit=400))
    model = load_canonical(mixtral_model)
    cpu = list(StreamedRunner(model, "cpu").iter_logits(windows))
    gpu = list(StreamedRunner(model, "cuda").iter_logits(windows))
    for a, b in zip(cpu, gpu):
        np.testing.assert_allclose(_log_probs(b), _log_probs(a), rtol=1e-4, atol=1e-4)


def test_bad_reference_mode_is_one_line_exit_2(gqa_model, tmp_path):
    r = CliRunner().invoke(cli, ["verify", str(gqa_model), str(tmp_path / "none.gguf"), "--reference", "halfway"])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and "--reference" in r.stderr
    from mtool.verify.report import run_verify
    from mtool.errors import VerifySetupError

    with pytest.raises(VerifySetupError, match="--reference must be auto, whole or streamed"):
        run_verify(gqa_model, gqa_model, reference="halfway")
