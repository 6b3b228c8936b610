"""The CUDA paths (`--device cuda`) against the CPU on the same tiny models: GPTQ, AWQ, the importance
matrix, and verify with the reference whole or streamed and a GGUF or GPTQ candidate.

Each test runs the same command on both devices and compares the results with each other and with the
float model: the GPU sums in another order (and GPTQ's error feedback carries a flipped rounding along
a row), so "the same" means the same quality and nearly the same numbers, not the same bytes. Skipped,
with the reason, where torch sees no GPU (tests/conftest.py)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mtool.cli import cli
from mtool.data import builtin_text
from mtool.verify.quantized import QuantizedRunner

from .helpers import hf_ids, hf_logits, mean_kld

pytestmark = pytest.mark.cuda


def _run(*args) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args])
    assert r.exit_code == 0, r.output + r.stderr
    return r.output


def test_gptq_solver_on_cuda_matches_cpu():
    """The GPTQ solve alone, same weight and Hessian on both devices: the same codes but for rounding
    near a tie (then carried along the row by the error feedback), the same output error."""
    from mtool.quantize.gptq import Hessian, gptq

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g)
    x = torch.randn(2048, 512, generator=g) * torch.rand(512, generator=g) * 3
    res, err = {}, {}
    for dev in ("cpu", "cuda"):
        h = Hessian(512, dev)
        h.add(x.to(dev))
        res[dev] = gptq(w, h, 4, 128, True)[0]
        d = (w - res[dev].dequant.cpu()).double()
        err[dev] = float(((d @ x.double().t()) ** 2).mean())
    same = float((res["cpu"].codes == res["cuda"].codes).double().mean())
    print(f"\ngptq solve: codes equal {100 * same:.2f} %, output error cpu {err['cpu']:.4e} cuda {err['cuda']:.4e}")
    assert same > 0.95
    assert err["cuda"] == pytest.approx(err["cpu"], rel=0.02)


@pytest.mark.parametrize("gs", [128, -1])
def test_gptq_column_loop_as_cuda_graph_is_the_same_as_launched(gs, monkeypatch):
    """The captured column loop replays the very kernels the eager loop launches: same bytes."""
    from mtool.quantize.gptq import Hessian, _BlockGraphs, gptq

    g = torch.Generator().manual_seed(1)
    w = torch.randn(384, 1024, generator=g)
    x = torch.randn(2048, 1024, generator=g) * torch.rand(1024, generator=g) * 3
    h = Hessian(1024, "cuda")
    h.add(x.cuda())
    res = {}
    for graphs in ("0", "1"):
        monkeypatch.setenv("MTOOL_CUDA_GRAPHS", graphs)
        res[graphs] = gptq(w, h, 4, gs, True)[0]
    assert any(v.by_width.get(128) is not None for v in _BlockGraphs._cache.values())
    for name in ("codes", "zeros", "scales", "g_idx", "dequant"):
        assert torch.equal(getattr(res["0"], name), getattr(res["1"], name)), name


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("which", ["llama", "mixtral"])
def test_quantization_on_cuda_matches_cpu(method, which, gqa_model, mixtral_model, tmp_path):
    """Whole conversions on both devices (Mixtral: the experts and the router on the GPU, where a token
    near a routing tie may go to another expert): the same quality, and closer to each other than to
    the float model."""
    src = gqa_model if which == "llama" else mixtral_model
    outs = {}
    for dev in ("cpu", "cuda"):
        outs[dev] = tmp_path / dev
        text = _run("convert", src, "-o", outs[dev], "--to", method, "--group-size", "32",
                    "--nsamples", "8", "--seqlen", "64", "--device", dev)
        assert f"on {dev} in" in text
    ids = hf_ids(src, builtin_text(), limit=256)
    ref = hf_logits(src, ids)
    runs = {dev: QuantizedRunner(out, "cpu") for dev, out in outs.items()}
    kld = {dev: mean_kld(ref, r.logits(ids).astype(np.float64)) for dev, r in runs.items()}
    between = mean_kld(runs["cpu"].logits(ids).astype(np.float64), runs["cuda"].logits(ids).astype(np.float64))
    sd = {dev: r.model.state_dict() for dev, r in runs.items()}
    names = [n for n in sd["cpu"] if n.endswith("proj.weight") or ".experts." in n]
    assert names
    # the same grid point: equal up to the float noise of a scale computed on another device
    same = sum(int(torch.isclose(sd["cuda"][n], sd["cpu"][n], rtol=1e-3, atol=1e-4 * float(sd["cpu"][n].abs().max())
                                 ).sum()) for n in names) / sum(sd["cpu"][n].numel() for n in names)
    print(f"\n{which} {method}: KLD vs float cpu {kld['cpu']:.3e} cuda {kld['cuda']:.3e}; between {between:.3e}; "
          f"dequantized weights equal {100 * same:.2f} %")
    assert same > 0.3
    assert kld["cuda"] < 1.25 * kld["cpu"] + 1e-4  # same quality on either device
    assert between < kld["cpu"]  # closer to each other than to the float model


def test_imatrix_on_cuda_matches_cpu(mixtral_model, tmp_path):
    files = {}
    for dev in ("cpu", "cuda"):
        files[dev] = tmp_path / f"{dev}.imatrix.gguf"
        _run("imatrix", mixtral_model, "-o", files[dev], "--nsamples", "8", "--seqlen", "64", "--device", dev, "-q")
    readers = {dev: gguf.GGUFReader(f) for dev, f in files.items()}
    tensors = {dev: {t.name: np.array(t.data, dtype=np.float64) for t in r.tensors} for dev, r in readers.items()}
    assert tensors["cpu"].keys() == tensors["cuda"].keys()
    assert any(".in_sum2" in n for n in tensors["cpu"])
    for name, a in tensors["cpu"].items():
        b = tensors["cuda"][name]
        assert a.shape == b.shape, name
        if name.endswith(".counts"):
            # routing may flip on a near tie between experts: a handful of tokens at most
            assert np.abs(a - b).sum() <= 0.01 * a.sum() + 2, name
        elif "ffn_" not in name or "_exps" not in name:
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 * float(np.abs(a).max()), err_msg=name)


@pytest.mark.parametrize("reference", ["whole", "streamed"])
def test_verify_on_cuda_matches_cpu(reference, gqa_model, tmp_path):
    """Reference on the GPU (whole or streamed) against a q8_0 GGUF (llama.cpp) and a GPTQ candidate
    (dequantized on the GPU): the same figures as on the CPU."""
    q8 = tmp_path / "m-q8_0.gguf"
    _run("convert", gqa_model, "-o", q8, "--outtype", "q8_0", "-q")
    gq = tmp_path / "gptq"
    _run("convert", gqa_model, "-o", gq, "--to", "gptq", "--bits", "8", "--group-size", "32", "--nsamples", "8",
         "--seqlen", "64", "--device", "cpu", "-q")
    for cand in (q8, gq):
        figures = {}
        for dev in ("cpu", "cuda"):
            js = tmp_path / f"{cand.name}-{dev}.json"
            text = _run("verify", gqa_model, cand, "--device", dev, "--reference", reference, "--ctx", "128",
                        "--max-windows", "4", "--json", js, "-q")
            assert f"({dev}, f32)" in text
            figures[dev] = json.loads(js.read_text())["metrics"]
        for k in ("ppl_ref", "ppl_cand", "ppl_ratio", "top1_agreement"):
            assert figures["cuda"][k] == pytest.approx(figures["cpu"][k], rel=1e-4, abs=1e-6), (cand.name, k)
        assert figures["cuda"]["kld_mean"] == pytest.approx(figures["cpu"]["kld_mean"], rel=2e-2, abs=1e-7), cand.name


def test_device_auto_picks_cuda():
    from mtool.device import resolve_device

    assert torch.cuda.is_available() and resolve_device("auto") == "cuda"
