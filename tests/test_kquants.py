"""K- and I-quant GGUF in one pass from the HF checkpoint (issue 10, without importance matrices).

Reference: llama.cpp's own quantizer, `llama_model_quantize` of the installed llama-cpp-python,
run on a bf16 GGUF of the same model (llama.cpp's route: convert to bf16, then quantize). The
one-pass file must hold the same tensors with the same types and the same bytes: same
policy (quant_policy.py), same kernels (mtool.ggml). The libggml that is loaded is the
reference, so compiler differences (FMA) cannot make the test wrong.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from mtool.cli import cli
from mtool.errors import OutputError
from mtool.tiny import TinySpec, make_tiny_llama

from .helpers import llama_quantize, tiny_with_bf16_gguf

TYPES = ["q4_k_m", "q5_k_m", "q6_k", "q3_k_m", "q2_k", "iq4_xs", "q3_k_l", "q4_k_s", "iq3_m"]
MODELS = {
    # GQA 4:1 (n_gqa >= 4 rules), untied, every row a multiple of 256
    "llama": TinySpec(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=1, tied=False, dtype="bfloat16", seed=5),
    # tied embeddings (token_embd takes the output rules) and ffn rows of 320: fallbacks
    "odd_rows": TinySpec(hidden=256, intermediate=320, layers=4, heads=4, kv_heads=2, tied=True, dtype="bfloat16", seed=6),
    # 8 experts, top-2: the 8-expert rules (attn_v/attn_k q8_0, attn_output q5_k)
    "mixtral": TinySpec(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, tied=False, experts=8,
                        dtype="bfloat16", seed=7),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kq")
    return {tag: tiny_with_bf16_gguf(root, tag, spec) for tag, spec in MODELS.items()}


@pytest.mark.parametrize("tag", list(MODELS))
@pytest.mark.parametrize("outtype", TYPES)
def test_one_pass_equals_llama_quantize(models, tmp_path, tag, outtype):
    src, bf16 = models[tag]
    ours_path = tmp_path / "ours.gguf"
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(ours_path), "--outtype", outtype, "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    ours = {t.name: t for t in gguf.GGUFReader(str(ours_path)).tensors}
    theirs = llama_quantize(bf16, tmp_path / "theirs.gguf", int(gguf.LlamaFileType["MOSTLY_" + outtype.upper()]))
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type, (name, t.tensor_type.name, theirs[name].tensor_type.name)
        assert np.asarray(t.data).tobytes() == np.asarray(theirs[name].data).tobytes(), name
    kinds = {t.tensor_type for t in ours.values()}
    assert len(kinds - {gguf.GGMLQuantizationType.F32}) >= 1
    if tag == "odd_rows" and outtype in ("q4_k_m", "q6_k"):
        assert "do not fit" in r.stderr  # fallbacks are reported, not silent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("kq_trained") / "m",
                           TinySpec(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, tied=False,
                                    train_steps=40, seed=8))


# 3- and 2-bit files of a model this small lose more than the 7-8B models the default thresholds
# come from (q3_k_m: PPL ratio 1.27 here); they are covered by the byte comparison above.
@pytest.mark.parametrize("outtype", ["q6_k", "q5_k_m", "q4_k_m", "iq4_xs"])
def test_kquant_gguf_verifies_against_hf(trained, tmp_path, outtype):
    out = tmp_path / f"m-{outtype}.gguf"
    r = CliRunner().invoke(cli, ["convert", str(trained), "-o", str(out), "--outtype", outtype, "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    r = CliRunner().invoke(cli, ["verify", str(trained), str(out), "--ctx", "128", "--max-windows", "6", "-q"])
    assert r.exit_code == 0, r.output + r.stderr
    assert outtype in r.output  # the artifact type is known, with its own thresholds


def test_imatrix_types_are_refused_before_any_work(trained, tmp_path):
    out = tmp_path / "x.gguf"
    r = CliRunner().invoke(cli, ["convert", str(trained), "-o", str(out), "--outtype", "iq2_xxs"])
    assert r.exit_code == 2 and "needs an importance matrix" in r.stderr and "--imatrix" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tag,imatrix", [("llama", False), ("mixtral", False), ("mixtral", True)])
def test_quantize_command_equals_the_one_pass_route(models, tmp_path, tag, imatrix):
    """`mtool quantize` of mtool's own bf16 GGUF gives the same tensors as `mtool convert` in one pass,
    and keeps the metadata and vocabulary; with an importance matrix too (experts quantized one by one,
    each with its own importances, into the one output tensor)."""
    src, bf16 = models[tag]
    one_pass, requant = tmp_path / "one.gguf", tmp_path / "re.gguf"
    extra = []
    if imatrix:
        im = tmp_path / "im.gguf"
        r = CliRunner().invoke(cli, ["imatrix", str(src), "-o", str(im), "--nsamples", "4", "--seqlen", "32", "-q"])
        assert r.exit_code == 0, r.output + r.stderr
        extra = ["--imatrix", str(im)]
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(one_pass), "--outtype", "q4_k_m", "-q", *extra])
    assert r.exit_code == 0, r.output + r.stderr
    r = CliRunner().invoke(cli, ["quantize", str(bf16), "-o", str(requant), "--outtype", "q4_k_m", "-q", *extra])
    assert r.exit_code == 0, r.output + r.stderr
    assert "bits per weight" in r.output and "fallback(s)" in r.output
    a = gguf.GGUFReader(str(one_pass))
    b = gguf.GGUFReader(str(requant))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert ta.keys() == tb.keys()
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type and np.asarray(t.data).tobytes() == np.asarray(tb[name].data).tobytes()
    src_meta = gguf.GGUFReader(str(bf16)).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "general.name", "llama.block_count"):
        assert b.fields[key].contents() == src_meta[key].contents(), key
    assert b.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)


def test_quantize_refuses_quantized_input(models, tmp_path):
    src, _ = models["llama"]
    q8 = tmp_path / "q8.gguf"
    assert CliRunner().invoke(cli, ["convert", str(src), "-o", str(q8), "--outtype", "q8_0", "-q"]).exit_code == 0
    out = tmp_path / "o.gguf"
    r = CliRunner().invoke(cli, ["quantize", str(q8), "-o", str(out), "--outtype", "q4_k_m"])
    assert r.exit_code == 2 and "holds quantized tensors" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()


def test_quantize_bad_paths_are_one_line(models, tmp_path):
    _, bf16 = models["llama"]
    r = CliRunner().invoke(cli, ["quantize", str(bf16), "-o", str(tmp_path / "o.bin"), "--outtype", "q4_k_m"])
    assert r.exit_code == 2 and "must end in .gguf" in r.stderr and r.stderr.count("\n") == 1
    split = tmp_path / "m-00001-of-00002.gguf"  # the second shard is missing
    split.write_bytes(bf16.read_bytes())
    out = tmp_path / "o.gguf"
    r = CliRunner().invoke(cli, ["quantize", str(split), "-o", str(out), "--outtype", "q4_k_m"])
    assert r.exit_code == 2 and "m-00002-of-00002.gguf" in r.stderr and "is missing" in r.stderr
    assert not out.exists()


def test_a_failed_write_cancels_every_queued_tensor(models, tmp_path, monkeypatch):
    """`mtool quantize` queues the next piece before writing the one before: when that write fails,
    both are cancelled (the newest too), nothing is written, and the error reaches the caller."""
    from mtool.convert import gguf_requantize as rq
    from mtool.convert.gguf_write import TensorData

    _, bf16 = models["llama"]
    submitted, cancelled = [], []
    real_submit, real_cancel = rq.submit_encode, rq.Queued.cancel
    monkeypatch.setattr(rq, "submit_encode", lambda *a, **k: submitted.append(real_submit(*a, **k)) or submitted[-1])
    monkeypatch.setattr(rq.Queued, "cancel", lambda self: cancelled.append(self) or real_cancel(self))
    writes = []
    real_piece = TensorData.piece

    def failing_write(self, data, **where):
        writes.append(data.nbytes)
        if len(writes) == 3:
            raise OSError(28, "No space left on device")
        real_piece(self, data, **where)

    monkeypatch.setattr(TensorData, "piece", failing_write)
    out = tmp_path / "o.gguf"
    with pytest.raises(OutputError, match="no space left"):
        rq.requantize_gguf(bf16, out, "q4_k_m", progress=False)
    assert submitted and any(q is submitted[-1] for q in cancelled)  # the tensor queued ahead of the failed write
    assert not out.exists()
