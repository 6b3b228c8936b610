"""Unit checks of pieces that have an independent reference: Q8_0 bytes, metrics, windows."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from mtool.convert.gguf_types import Q, encode
from mtool.dtypes import BF16, F32, as_dtype, to_storage
from mtool.ggml import _numpy_convert, ggml
from mtool.numerics import scan_storage, scan_values
from mtool.verify.data import token_windows
from mtool.verify.metrics import ParityAccumulator


def _weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[3] = 0.0  # all-zero blocks
    w[5, :32] = torch.arange(32) * 0.5 - 8  # exact .5 ties after scaling
    w[7, :32] = torch.tensor([2.0 ** -20] * 31 + [1.0])  # values that round to zero
    return w


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_legacy_quant_bytes_equal_gguf_py(qtype):
    """libggml's legacy quantizers against gguf-py's numpy ones (what llama.cpp's converter uses for Q8_0),
    from f32 and from bf16 storage."""
    w = _weights()
    ours = encode(w.numpy(), F32, qtype)
    ref = gguf.quants.quantize(w.numpy(), qtype)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    wb = w.bfloat16()
    ours_bf16 = encode(wb.view(torch.int16).numpy().view(np.uint16), BF16, qtype)
    np.testing.assert_array_equal(ours_bf16, gguf.quants.quantize(wb.float().numpy(), qtype))


def _special_f32() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(5000).astype(np.float32) * np.float32(10.0) ** rng.integers(-8, 6, 5000),
        np.array([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e6, -1e6, 6e-8, 3e-8, 1e-45, 2.0 ** -24, 2.0 ** -25,
                  1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, np.inf, -np.inf],
                 dtype=np.float32),
    ])
    return x.astype(np.float32)  # odd length: the converters' vector loops and scalar tails both run


def test_float_converters_round_like_torch_and_numpy():
    """libggml-cpu's converters (and the numpy fallback) against numpy's and torch's RNE casts,
    with ties, subnormals, overflow and infinities."""
    g = ggml()
    x = _special_f32()
    xt = torch.from_numpy(x)
    want = {
        ("float32", "bfloat16"): xt.bfloat16().view(torch.int16).numpy().view(np.uint16),
    }
    bf = want[("float32", "bfloat16")]
    want[("bfloat16", "float32")] = torch.from_numpy(bf.view(np.int16)).view(torch.bfloat16).float().numpy()
    with np.errstate(over="ignore"):  # 1e6 -> inf, as intended
        want[("bfloat16", "float16")] = want[("bfloat16", "float32")].astype(np.float16)
        want[("float32", "float16")] = x.astype(np.float16)
    f16 = want[("float32", "float16")]
    want[("float16", "float32")] = f16.astype(np.float32)
    src = {"float32": x, "float16": f16, "bfloat16": bf}
    for (a, b), expect in want.items():
        for got in (g.convert(src[a], a, b), _numpy_convert(src[a], a, b) if "float32" in (a, b) else None):
            if got is None:
                continue
            assert got.dtype == expect.dtype, (a, b)
            np.testing.assert_array_equal(got.view(np.uint8), expect.view(np.uint8), err_msg=f"{a} -> {b}")


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_scan_storage_agrees_with_torch(name):
    """The bit-pattern scan (finite?, max |x|) of numpy storage against torch's aminmax scan."""
    dt = as_dtype(name)
    rng = np.random.default_rng(1)
    mixed = torch.from_numpy(rng.standard_normal(3 * (1 << 20) + 7).astype(np.float32) * 100).to(dt.torch)
    # signs matter to the scan (it reads sign and magnitude as integers): mixed, one sign only, zeros
    for label, base in (("mixed", mixed), ("negative", -mixed.abs()), ("positive", mixed.abs()),
                        ("-0", torch.full((5,), -0.0, dtype=dt.torch)), ("0", torch.zeros(5, dtype=dt.torch))):
        for poison in (None, float("nan"), -float("nan"), float("inf"), float("-inf"), -70000.0, 70000.0):
            t = base.clone()
            if poison is not None:
                t[min((1 << 20) + 3, t.numel() - 1)] = poison  # in the second chunk
            finite, amax = scan_storage(to_storage(t, dt), dt)
            t_finite, t_amax = scan_values(t)
            assert finite == t_finite, (name, label, poison)
            if finite:
                assert amax == t_amax, (name, label, poison)


def test_metrics_against_torch():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(10, 50, generator=g, dtype=torch.float64)
    cand = ref + 0.1 * torch.randn(10, 50, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 50, (10,), generator=g).tolist()
    acc = ParityAccumulator()
    acc.add(ids, ref.numpy(), cand.numpy())
    r = acc.result()
    lr, lc = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    kld = torch.nn.functional.kl_div(lc, lr, log_target=True, reduction="none").sum(-1)
    assert abs(r["kld_mean"] - float(kld.mean())) < 1e-12
    nll = torch.nn.functional.cross_entropy(ref[:-1], torch.tensor(ids[1:]))
    assert abs(r["ppl_ref"] - float(torch.exp(nll))) < 1e-9
    assert r["top1_agreement"] == float((ref.argmax(-1) == cand.argmax(-1)).double().mean())


def test_metrics_across_row_chunks_and_windows():
    """Windows longer than the accumulator's row chunk (and two windows): the same figures as one
    computation over all positions."""
    from mtool.verify import metrics

    g = torch.Generator().manual_seed(2)
    n = 2 * metrics.ROWS + 23
    refs = [torch.randn(n, 40, generator=g, dtype=torch.float64) for _ in range(2)]
    cands = [r + 0.2 * torch.randn(n, 40, generator=g, dtype=torch.float64) for r in refs]
    ids = [torch.randint(0, 40, (n,), generator=g).tolist() for _ in range(2)]
    acc = ParityAccumulator()
    for i, r, c in zip(ids, refs, cands):
        acc.add(i, r.numpy().astype(np.float32), c.numpy().astype(np.float32))
    res = acc.result()
    ref32 = [r.float().double() for r in refs]
    cand32 = [c.float().double() for c in cands]
    ref, cand = torch.cat(ref32), torch.cat(cand32)
    lr, lc = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    kld = torch.nn.functional.kl_div(lc, lr, log_target=True, reduction="none").sum(-1)
    assert res["positions"] == 2 * n
    assert abs(res["kld_mean"] - float(kld.mean())) < 1e-12
    nll = torch.cat([torch.nn.functional.cross_entropy(r[:-1], torch.tensor(i[1:]), reduction="none")
                     for r, i in zip(ref32, ids)])
    assert abs(res["ppl_ref"] - float(torch.exp(nll.mean()))) < 1e-9
    assert res["top1_agreement"] == float((ref.argmax(-1) == cand.argmax(-1)).double().mean())
    assert res["max_abs_dlogit"] == float((ref - cand).abs().max())


def test_windows_start_with_bos():
    ids = [1] + list(range(100, 400))
    ws = token_windows(ids, ctx=64, max_windows=3, bos_id=1)
    assert len(ws) == 3 and all(len(w) == 64 and w[0] == 1 for w in ws)
    assert ws[1][1] == ws[0][-1] + 1  # consecutive, no token skipped


def test_expert_naming_round_trips_and_fused_rows():
    import torch

    from mtool.model import experts

    for short in ("block_sparse_moe.experts.7.w1.qweight", "block_sparse_moe.experts.0.w2.weight",
                  "block_sparse_moe.gate.weight", "self_attn.q_proj.bias"):
        assert experts.from_gptqmodel(experts.to_gptqmodel(short)) == short
    assert experts.to_gptqmodel("block_sparse_moe.experts.3.w3.scales") == "mlp.experts.3.up_proj.scales"
    assert experts.to_gptqmodel("block_sparse_moe.gate.weight") == "mlp.gate.weight"
    assert experts.gguf_stack(5, "w2") == "blk.5.ffn_down_exps.weight"
    # fused rows address the same values transformers' fused parameters hold
    n, f, h = 3, 4, 5
    per = {experts.legacy(e, w) + ".weight": torch.randn(f if w != "w2" else h, h if w != "w2" else f)
           for e in range(n) for w in ("w1", "w2", "w3")}
    fused = experts.to_fused({**per, experts.ROUTER + ".weight": torch.zeros(n, h)}, n)
    for e in range(n):
        for w in ("w1", "w2", "w3"):
            name, row0, rows = experts.fused_rows(e, w, f, h)
            t = fused[name]
            got = t.reshape(-1, t.shape[-1])[row0 : row0 + rows]
            assert torch.equal(got, per[experts.legacy(e, w) + ".weight"])


def test_fast_gguf_reader_builds_gguf_pys_fields(tmp_path):
    """mtool's reader (arrays parsed in one pass) against gguf-py's own, field by field: every
    array element type, empty strings, Chinese, a nested array (gguf-py's path)."""
    import gguf

    from mtool.gguf_file import open_gguf

    T = gguf.GGUFValueType
    path = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(path, "llama")
    for i, sub in enumerate([T.UINT8, T.INT8, T.UINT16, T.INT16, T.UINT32, T.INT32, T.FLOAT32, T.UINT64,
                             T.INT64, T.FLOAT64]):
        w.add_key_value(f"test.arr{i}", [0, 1, 2, 3] if "INT" in sub.name else [0.5, -1.25, 3.0], T.ARRAY, sub)
    w.add_key_value("test.bools", [True, False, True], T.ARRAY, T.BOOL)
    w.add_key_value("test.strings", ["", "a", "中文词", "<|endofutterance|>", ""], T.ARRAY, T.STRING)
    w.add_key_value("test.nested", [[1, 2], [3]], T.ARRAY, T.ARRAY)
    w.add_string("test.scalar", "x")
    w.add_uint32("test.n", 7)
    w.add_tensor("t", np.arange(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    want, got = gguf.GGUFReader(path), open_gguf(path)
    assert list(want.fields) == list(got.fields)
    for key, a in want.fields.items():
        b = got.fields[key]
        assert (a.offset, a.data, a.types) == (b.offset, b.data, b.types), key
        assert len(a.parts) == len(b.parts), key
        for x, y in zip(a.parts, b.parts):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), key
        assert a.contents() == b.contents(), key
    assert got.fields["test.strings"].contents() == ["", "a", "中文词", "<|endofutterance|>", ""]
    np.testing.assert_array_equal(got.tensors[0].data, np.arange(8, dtype=np.float32))


def test_recycler_reuses_only_its_own_buffers():
    from mtool.buffers import Recycler

    r = Recycler(keep=1)
    a = r.take(1000)
    base = a.ctypes.data
    r.give(a.view(np.float16).reshape(10, 50))  # a view of it comes back after writing
    b = r.take(800)  # smaller fits: the same memory
    assert b.ctypes.data == base and b.size == 800
    r.give(np.empty(5000, np.uint8))  # not made here: not kept
    assert r.take(5000).ctypes.data != base
    r.give(b)
    r.give(r.take(2000))  # keep=1: the larger stays
    assert r.take(1500).size == 1500 and r.take(1000).ctypes.data != base


@pytest.mark.parametrize("shape", ["gqa_untied_spm", "mha_tied_bpe"])
def test_verify_tokenizes_only_the_text_its_windows_need(shape, tiny_models, tmp_path):
    """A large --data file: the windows (and the text both tokenizers are compared on) come from a
    prefix, and they are the windows the whole text gives: from a long Chinese line without spaces
    (the prefix cut mid-line) and from English lines after it."""
    from mtool.data import builtin_text
    from mtool.verify.report import open_reference
    from mtool.verify.reftok import ReferenceTokenizer

    model = tiny_models[shape]
    chinese = "大型语言模型的转换与量化需要逐层验证每个工件的正确性" * 200  # one line, no spaces
    full = "\n".join([chinese] + [builtin_text()] * 60)
    data = tmp_path / "corpus.txt"
    data.write_text(full, encoding="utf-8")
    tok = ReferenceTokenizer.open(model)
    ids = tok.encode(full)
    bos = tok.bos_id if ids and tok.bos_id is not None and ids[0] == tok.bos_id else None
    for ctx, n in ((64, 4), (128, 8), (256, 60)):
        r = open_reference(model, data=data, ctx=ctx, max_windows=n)
        assert r.windows == token_windows(ids, ctx, n, bos), (ctx, n)
        assert len(r.text) < len(full) and full.startswith(r.text)
