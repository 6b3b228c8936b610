"""Unit checks of pieces that have an independent reference: Q8_0 bytes, metrics, windows."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from mtool.convert.gguf_types import Q, encode
from mtool.verify.data import token_windows
from mtool.verify.metrics import ParityAccumulator


def test_q8_0_encoder_is_byte_identical_to_gguf_py():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g)
    w[3] = 0.0  # all-zero blocks
    w[5, :32] = torch.arange(32) * 0.5 - 8  # exact .5 ties after scaling
    ours = encode(w, Q.Q8_0)
    ref = gguf.quants.quantize(w.numpy(), Q.Q8_0)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_bf16_and_f16_encoders_round_trip():
    w = torch.randn(8, 64)
    assert np.array_equal(encode(w, Q.F16), w.half().numpy())
    bf = encode(w, Q.BF16)
    back = gguf.quants.dequantize(bf.view(np.uint8), Q.BF16).reshape(8, 64)
    np.testing.assert_array_equal(back, w.bfloat16().float().numpy())


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
