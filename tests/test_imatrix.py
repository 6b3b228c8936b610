"""Importance matrices (issue 10): `mtool imatrix`, `--imatrix` on convert and quantize, and the
llama-quantize options (--tensor-type, --output-tensor-type, --token-embedding-type, --no-fallback).

References: the sums are recomputed here from the whole HF model with forward hooks (not mtool's
layer runner); the quantized bytes come from llama.cpp's own `llama_model_quantize`, fed the
importances that this file reads back from mtool's imatrix with gguf-py and normalizes the way
llama-quantize's loader does; the legacy .dat is written here from the C++ writer's layout.
"""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mtool.cli import cli
from mtool.quantize.calib import calibration_ids
from mtool.tiny import TinySpec, make_tiny_llama

from .helpers import (hf_logits, imatrix_importances, llama_quantize, llamacpp_logits, mean_kld, same_tensors,
                      tiny_with_bf16_gguf)

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
SPECS = {
    "llama": TinySpec(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=1, tied=False, dtype="bfloat16",
                      train_steps=10, seed=11),
    "mixtral": TinySpec(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, tied=False, experts=8,
                        dtype="bfloat16", train_steps=10, seed=12),
}
NSAMPLES, SEQLEN = 8, 64


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tag -> (HF dir, bf16 GGUF, imatrix.gguf made by `mtool imatrix`, its stdout)."""
    root = tmp_path_factory.mktemp("imx")
    out = {}
    for tag, spec in SPECS.items():
        src, bf16 = tiny_with_bf16_gguf(root, tag, spec)
        im = root / f"{tag}.imatrix.gguf"
        r = run("imatrix", src, "-o", im, "--nsamples", NSAMPLES, "--seqlen", SEQLEN, "-q")
        assert r.exit_code == 0, r.output + r.stderr
        out[tag] = (src, bf16, im, r.output)
    return out


def _reference_sums(src, moe: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """GGUF name -> (sums [n_mat, cols], counts) from the whole HF model with hooks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = calibration_ids(src, None, NSAMPLES, SEQLEN)
    sums: dict[str, list] = {}
    hooks = []
    short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}

    def add(name, x, mat=0, n_mat=1):
        x = x.reshape(-1, x.shape[-1]).double()
        s = sums.setdefault(name, [np.zeros((n_mat, x.shape[1])), np.zeros(n_mat)])
        s[0][mat] += (x**2).sum(0).numpy()
        s[1][mat] += x.shape[0]

    for i, layer in enumerate(model.model.layers):
        for mod_name, gname in short.items():
            mod = layer.get_submodule(mod_name) if not (moe and mod_name.startswith("mlp.")) else None
            if mod is not None:
                hooks.append(mod.register_forward_pre_hook(lambda m, a, n=f"blk.{i}.{gname}.weight": add(n, a[0])))
        if moe:
            def gate_hook(m, args, output, i=i, layer=layer):
                x = args[0].reshape(-1, args[0].shape[-1])
                chosen = output[2]
                add(f"blk.{i}.ffn_gate_inp.weight", x)
                gu, down = layer.mlp.experts.gate_up_proj.data, layer.mlp.experts.down_proj.data
                f = gu.shape[1] // 2
                for e in range(gu.shape[0]):
                    tok = x[(chosen == e).any(-1)]
                    add(f"blk.{i}.ffn_gate_exps.weight", tok, e, gu.shape[0])
                    add(f"blk.{i}.ffn_up_exps.weight", tok, e, gu.shape[0])
                    mid = torch.nn.functional.silu(tok @ gu[e, :f].t()) * (tok @ gu[e, f:].t())
                    add(f"blk.{i}.ffn_down_exps.weight", mid, e, gu.shape[0])
                    assert down[e].shape[1] == mid.shape[1]
            hooks.append(layer.mlp.gate.register_forward_hook(gate_hook))
    with torch.no_grad():
        model(ids)
    return {n: (s[0], s[1]) for n, s in sums.items()}


@pytest.mark.parametrize("tag", list(SPECS))
def test_imatrix_sums_are_the_hf_models_squared_inputs(models, tag):
    src, _, im, stdout = models[tag]
    reader = gguf.GGUFReader(str(im))
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.fields["imatrix.chunk_count"].contents() == NSAMPLES
    assert reader.fields["imatrix.chunk_size"].contents() == SEQLEN
    names = [t.name for t in reader.tensors]
    bases = [n.removesuffix(".in_sum2") for n in names[::2]]
    assert bases == sorted(bases) and names[1::2] == [b + ".counts" for b in bases]  # llama-imatrix's order
    ours = {t.name: np.array(t.data, dtype=np.float64) for t in reader.tensors}
    ref = _reference_sums(src, tag == "mixtral")
    assert {n + ".in_sum2" for n in ref} | {n + ".counts" for n in ref} == set(ours)
    for name, (sums, counts) in ref.items():
        np.testing.assert_allclose(ours[name + ".in_sum2"].reshape(sums.shape), sums, rtol=2e-4, err_msg=name)
        np.testing.assert_array_equal(ours[name + ".counts"].reshape(-1), counts, err_msg=name)
    if tag == "mixtral":
        # per-expert counts are reported, and every token went to top-2 experts
        for i in range(2):
            c = ours[f"blk.{i}.ffn_gate_exps.weight.counts"]
            assert c.sum() == 2 * NSAMPLES * SEQLEN and (c > 0).all()
            assert f"layer   {i}: routed tokens per expert {[int(v) for v in c.reshape(-1)]}" in stdout


CASES = [("llama", t) for t in ("q4_k_m", "iq4_xs", "q3_k_m", "iq2_xxs", "iq1_m")] + \
        [("mixtral", t) for t in ("q4_k_m", "iq3_xxs", "iq2_m", "q2_k")]


@pytest.mark.parametrize("tag,outtype", CASES)
def test_one_pass_with_imatrix_equals_llama_quantize(models, tmp_path, tag, outtype):
    src, bf16, im, _ = models[tag]
    ours = tmp_path / "ours.gguf"
    r = run("convert", src, "-o", ours, "--outtype", outtype, "--imatrix", im, "-q")
    assert r.exit_code == 0, r.output + r.stderr
    theirs = llama_quantize(bf16, tmp_path / "theirs.gguf", int(FT["MOSTLY_" + outtype.upper()]),
                            imatrix=imatrix_importances(im))
    same_tensors(ours, theirs)
    meta = gguf.GGUFReader(str(ours)).fields
    assert meta["quantize.imatrix.file"].contents() == str(im)
    assert meta["quantize.imatrix.entries_count"].contents() == len(imatrix_importances(im))
    assert meta["quantize.imatrix.chunks_count"].contents() == NSAMPLES


@pytest.mark.parametrize("tag", list(SPECS))
def test_tensors_read_in_pieces_give_the_same_bytes(models, tmp_path, monkeypatch, tag):
    """Large tensors are read and encoded in row pieces (gguf_write.PIECE_BYTES); made small here, every
    matrix is cut (uneven last pieces; q/k in whole heads, their rows reordered per head; experts
    row by row within each expert, each with its slice of importances), and the file must still be
    the one llama.cpp's quantizer writes."""
    from mtool.convert import gguf_export, gguf_write
    from mtool.model.families import load_canonical

    src, bf16, im, _ = models[tag]
    rows_per_head, row_bytes = 64, 256 * 2  # head_dim 64, hidden 256 in bf16
    monkeypatch.setattr(gguf_write, "PIECE_BYTES", 3 * rows_per_head * row_bytes)  # three heads' rows
    model = load_canonical(src)
    planned, _ = gguf_export.plan_tensors(model, "q4_k_m")
    pieces = gguf_export._pieces(model, planned, {})
    q = [p.rows for p in pieces if p.tensor.gguf_name == "blk.0.attn_q.weight"]
    assert q == [(0, 192), (64 * 3, 64)]  # 4 heads: three, then one
    assert len(pieces) > 2 * len(planned)
    ours = tmp_path / "ours.gguf"
    r = run("convert", src, "-o", ours, "--outtype", "q4_k_m", "--imatrix", im, "-q")
    assert r.exit_code == 0, r.output + r.stderr
    theirs = llama_quantize(bf16, tmp_path / "theirs.gguf", int(FT.MOSTLY_Q4_K_M), imatrix=imatrix_importances(im))
    same_tensors(ours, theirs)
    # `mtool quantize` reads the bf16 GGUF in pieces too (rows of one expert at a time for the stacks)
    from mtool.convert import gguf_requantize

    stack = max(gguf.GGUFReader(str(bf16)).tensors, key=lambda t: int(t.n_bytes))
    shape = tuple(int(d) for d in reversed(stack.shape))
    assert len(gguf_requantize._pieces(0, stack, shape, Q.Q4_K, None)) > 2 * (shape[0] if len(shape) == 3 else 1)
    requant = tmp_path / "requant.gguf"
    r = run("quantize", bf16, "-o", requant, "--outtype", "q4_k_m", "--imatrix", im, "-q")
    assert r.exit_code == 0, r.output + r.stderr
    same_tensors(requant, theirs)
    again = tmp_path / "bf16.gguf"  # stored rows in pieces: the bf16 file made whole, bit for bit
    assert run("convert", src, "-o", again, "--outtype", "bf16", "-q").exit_code == 0
    same_tensors(again, {t.name: t for t in gguf.GGUFReader(str(bf16)).tensors})


def test_importances_change_the_bytes(models, tmp_path):
    """Guard for the test above: without the imatrix llama.cpp writes other bytes."""
    src, bf16, im, _ = models["llama"]
    ours = tmp_path / "ours.gguf"
    assert run("convert", src, "-o", ours, "--outtype", "iq4_xs", "--imatrix", im, "-q").exit_code == 0
    plain = llama_quantize(bf16, tmp_path / "plain.gguf", int(FT.MOSTLY_IQ4_XS))
    with pytest.raises(AssertionError):
        same_tensors(ours, plain)


def test_quantize_with_imatrix_equals_the_one_pass_route(models, tmp_path):
    src, bf16, im, _ = models["mixtral"]
    one, re_ = tmp_path / "one.gguf", tmp_path / "re.gguf"
    assert run("convert", src, "-o", one, "--outtype", "iq2_xxs", "--imatrix", im, "-q").exit_code == 0
    r = run("quantize", bf16, "-o", re_, "--outtype", "iq2_xxs", "--imatrix", im, "-q")
    assert r.exit_code == 0, r.output + r.stderr
    same_tensors(re_, {t.name: t for t in gguf.GGUFReader(str(one)).tensors})
    assert gguf.GGUFReader(str(re_)).fields["quantize.imatrix.dataset"].contents() == "built-in"


def _write_legacy_dat(path, gguf_imatrix, chunk_size: int) -> dict[str, np.ndarray]:
    """llama-imatrix's legacy writer (save_imatrix_legacy) in Python; returns the importances
    llama-quantize's loader derives from it (value / ncall)."""
    t = {x.name: np.array(x.data, dtype=np.float32) for x in gguf.GGUFReader(str(gguf_imatrix)).tensors}
    names = sorted(n[: -len(".in_sum2")] for n in t if n.endswith(".in_sum2"))
    blob, expected = [struct.pack("<i", len(names))], {}
    for name in names:
        counts, sums = t[name + ".counts"].reshape(-1), t[name + ".in_sum2"].reshape(-1)
        ncall = int((counts.max() + chunk_size - 1) // chunk_size)
        per = sums.size // counts.size
        vals = np.array([(sums[i] / np.float32(counts[i // per])) * np.float32(ncall) for i in range(sums.size)],
                        dtype=np.float32)
        blob += [struct.pack("<i", len(name)), name.encode(), struct.pack("<ii", ncall, sums.size), vals.tobytes()]
        expected[name] = (vals / np.float32(ncall)).astype(np.float32)
    blob += [struct.pack("<i", 8), struct.pack("<i", 9), b"calib.txt"]
    path.write_bytes(b"".join(blob))
    return expected


def test_legacy_dat_imatrix_is_read_as_llama_quantize_reads_it(models, tmp_path):
    src, bf16, im, _ = models["llama"]
    dat = tmp_path / "imatrix.dat"
    expected = _write_legacy_dat(dat, im, SEQLEN)
    ours = tmp_path / "ours.gguf"
    r = run("convert", src, "-o", ours, "--outtype", "iq2_xs", "--imatrix", dat, "-q")
    assert r.exit_code == 0, r.output + r.stderr
    same_tensors(ours, llama_quantize(bf16, tmp_path / "theirs.gguf", int(FT.MOSTLY_IQ2_XS), imatrix=expected))
    assert gguf.GGUFReader(str(ours)).fields["quantize.imatrix.dataset"].contents() == "calib.txt"


def test_overrides_equal_llama_quantize(models, tmp_path):
    src, bf16, _, _ = models["llama"]
    ours = tmp_path / "ours.gguf"
    r = run("convert", src, "-o", ours, "--outtype", "q4_k_m", "--tensor-type", "attn_v=q8_0",
            "--tensor-type", r"blk\.1\.ffn_down=IQ4_NL", "--output-tensor-type", "q8_0",
            "--token-embedding-type", "q4_k", "-q")
    assert r.exit_code == 0, r.output + r.stderr
    theirs = llama_quantize(bf16, tmp_path / "theirs.gguf", int(FT.MOSTLY_Q4_K_M),
                            tensor_types={"attn_v": Q.Q8_0, r"blk\.1\.ffn_down": Q.IQ4_NL},
                            output_type=Q.Q8_0, token_embedding_type=Q.Q4_K)
    same_tensors(ours, theirs)
    assert theirs["blk.0.attn_v.weight"].tensor_type == Q.Q8_0 and theirs["output.weight"].tensor_type == Q.Q8_0
    assert theirs["blk.1.ffn_down.weight"].tensor_type == Q.IQ4_NL


def test_no_fallback_turns_a_fallback_into_an_error(tmp_path):
    src = make_tiny_llama(tmp_path / "odd", TinySpec(hidden=256, intermediate=320, layers=1, heads=4, seed=13))
    out = tmp_path / "o.gguf"
    r = run("convert", src, "-o", out, "--outtype", "q4_k_m", "--no-fallback")
    assert r.exit_code == 2 and "--no-fallback" in r.stderr and "320" in r.stderr
    assert r.stderr.count("\n") == 1 and not out.exists()
    r = run("convert", src, "-o", out, "--outtype", "q4_k_m", "-q")
    assert r.exit_code == 0 and "do not fit" in r.stderr and "1 fallback(s)" in r.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("imx_trained")
    src = make_tiny_llama(root / "m", TinySpec(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2,
                                               tied=False, train_steps=60, seed=14))
    im = root / "m.imatrix.gguf"
    assert run("imatrix", src, "-o", im, "--nsamples", 16, "--seqlen", 128, "-q").exit_code == 0
    return src, im


@pytest.mark.parametrize("outtype", ["iq4_xs", "q3_k_m"])
def test_imatrix_lowers_the_kl_divergence(trained, tmp_path, outtype):
    from .helpers import hf_ids

    src, im = trained
    ids = hf_ids(src, "The quick brown fox jumps over the lazy dog. " * 4 + "人工智能正在改变世界。" * 8, limit=200)
    ref = hf_logits(src, ids)
    kld = {}
    for tag, extra in (("plain", ()), ("imatrix", ("--imatrix", im))):
        out = tmp_path / f"{tag}.gguf"
        assert run("convert", src, "-o", out, "--outtype", outtype, *extra, "-q").exit_code == 0
        kld[tag] = mean_kld(ref, llamacpp_logits(out, ids))
    assert kld["imatrix"] < kld["plain"], kld


def _bad(args, out):
    r = run(*args)
    assert r.exit_code == 2, r.output + r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert not out.exists()
    return r.stderr


def test_bad_imatrix_inputs_are_one_line_and_write_nothing(models, tmp_path):
    src, bf16, im, _ = models["llama"]
    _, moe_bf16, moe_im, _ = models["mixtral"]
    out = tmp_path / "o.gguf"
    assert "another model" in _bad(["convert", src, "-o", out, "--outtype", "iq2_xxs", "--imatrix", moe_im], out)
    assert "another model" in _bad(["quantize", moe_bf16, "-o", out, "--outtype", "q4_k_m", "--imatrix", im], out)
    cut = tmp_path / "cut.imatrix.gguf"
    cut.write_bytes(im.read_bytes()[: im.stat().st_size // 2])
    assert "truncated" in _bad(["convert", src, "-o", out, "--outtype", "q4_k_m", "--imatrix", cut], out)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x02\x00\x00\x00\x05\x00\x00\x00blk.0")
    assert "junk.dat" in _bad(["convert", src, "-o", out, "--outtype", "q4_k_m", "--imatrix", junk], out)
    assert "needs an importance matrix" in _bad(["quantize", bf16, "-o", out, "--outtype", "iq1_s"], out)
    assert "K-/I-quant" in _bad(["convert", src, "-o", out, "--outtype", "q8_0", "--imatrix", im], out)
    assert "REGEX=TYPE" in _bad(["convert", src, "-o", out, "--outtype", "q4_k_m", "--tensor-type", "attn_v"], out)
    assert "unknown tensor type" in _bad(["convert", src, "-o", out, "--outtype", "q4_k_m",
                                          "--output-tensor-type", "q9_k"], out)
    assert "--to gguf" in _bad(["convert", src, "-o", tmp_path / "hf", "--to", "hf", "--imatrix", im], tmp_path / "hf")
    # an entry missing for a tensor whose type needs one
    from mtool.convert.imatrix_file import read_imatrix, write_imatrix

    partial = read_imatrix(im)
    partial.sums.pop("blk.1.attn_q.weight")
    partial.counts.pop("blk.1.attn_q.weight")
    part = tmp_path / "partial.imatrix.gguf"
    write_imatrix(part, partial)
    assert "blk.1.attn_q.weight" in _bad(["convert", src, "-o", out, "--outtype", "iq2_xxs", "--imatrix", part], out)
    assert "must end in .gguf" in _bad(["imatrix", src, "-o", tmp_path / "x.dat"], tmp_path / "x.dat")
