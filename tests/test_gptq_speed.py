"""GPTQ's speed-ups change no result: the output memo (each linear computed once per layer), the
symmetric Hessian products, and the column loop against the paper's unblocked algorithm."""

from __future__ import annotations

import pytest
import torch

from mtool.model.families import load_canonical
from mtool.quantize import engine
from mtool.quantize.calib import calibration_ids
from mtool.quantize.engine import QuantSettings, iter_quantized_layers
from mtool.quantize.gptq import Hessian, _gram, gptq, grid


def _run(model_dir, monkeypatch, memo_bytes):
    """Quantize every layer; returns the results, the layer outputs and, per layer, how often each
    nn.Linear computed (counted in the class's forward: a replayed module's never runs, while its
    hooks would still fire)."""
    model = load_canonical(model_dir)
    ids = calibration_ids(model.tokenizer_dir, None, 6, 32)
    calls: list[dict[str, int]] = []
    names: dict[int, str] = {}
    build, linear_forward = engine.build_layer, torch.nn.Linear.forward

    def counting_build(*a, **k):
        layer = build(*a, **k)
        calls.append({})
        names.update({id(m): n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)})
        return layer

    def counting_forward(self, x):
        n = names[id(self)]
        calls[-1][n] = calls[-1].get(n, 0) + 1
        return linear_forward(self, x)

    monkeypatch.setattr(engine, "build_layer", counting_build)
    monkeypatch.setattr(torch.nn.Linear, "forward", counting_forward)
    outs = []
    s = QuantSettings("gptq", bits=4, group_size=32, batch=2, memo_bytes=memo_bytes)
    forward = engine.LayerRunner.forward

    def keep_output(self, layer, x):
        y = forward(self, layer, x)
        outs.append(y.clone())
        return y

    monkeypatch.setattr(engine.LayerRunner, "forward", keep_output)
    results = [{n: r.codes.clone() for n, r in res.items()} for _, _, res, _ in iter_quantized_layers(model, ids, s)]
    monkeypatch.undo()
    return results, outs, calls


@pytest.mark.parametrize("which", ["gqa", "moe"])
def test_memo_changes_no_result_and_computes_each_linear_once(which, gqa_model, mixtral_model, monkeypatch):
    src = gqa_model if which == "gqa" else mixtral_model
    plain, plain_out, plain_calls = _run(src, monkeypatch, memo_bytes=0)
    fast, fast_out, fast_calls = _run(src, monkeypatch, memo_bytes=None)
    assert len(plain) == len(fast) >= 2
    for a, b in zip(plain, fast):
        assert a.keys() == b.keys()
        for n in a:
            assert torch.equal(a[n], b[n]), n  # the very same codes
    for a, b in zip(plain_out, fast_out):
        assert torch.equal(a, b)  # and the very same activations for the next layer
    batches = 3  # 6 windows, 2 per forward
    attn = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    for seen in fast_calls:
        for n in attn:
            assert seen[n] == batches, (n, seen)  # once per batch, not once per true-sequential pass
        if which == "gqa":
            for n in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                assert seen[n] == batches, (n, seen)
    for seen in plain_calls:
        if which == "gqa":  # without the memo q/k/v ran in the o, gate/up, down and final passes
            assert seen["self_attn.q_proj"] == 4 * batches and seen["mlp.gate_proj"] == 2 * batches
        else:  # in the o pass, the one that captures the experts' input, and the final one
            assert seen["self_attn.q_proj"] == 3 * batches


def test_memo_budget_is_respected(gqa_model, monkeypatch):
    """A budget that holds the attention outputs but not gate/up's: the big ones are recomputed."""
    model = load_canonical(gqa_model)
    ids = calibration_ids(model.tokenizer_dir, None, 6, 32)
    kept: list[int] = []
    finish = engine.OutputMemo.finish

    def watch(self, names):
        kept.append(self.nbytes())
        finish(self, names)

    monkeypatch.setattr(engine.OutputMemo, "finish", watch)
    hidden = model.config["hidden_size"]
    budget = 6 * 32 * hidden * 4 + 1024  # self_attn's output for all windows (float32) and a little
    s = QuantSettings("gptq", bits=4, group_size=32, batch=2, memo_bytes=budget)
    for *_, rep in iter_quantized_layers(model, ids, s):
        pass
    assert max(kept) <= budget and max(kept) > 0


@pytest.mark.parametrize("columns", [64, 1100, 1536])
def test_symmetric_gram_equals_the_full_product(columns):
    x = torch.randn(300, columns, generator=torch.Generator().manual_seed(columns))
    g = _gram(x, 256)
    assert torch.equal(g, g.t())
    torch.testing.assert_close(g, x.t() @ x, rtol=1e-5, atol=1e-3)


def _paper_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, gs: int, damp: float) -> torch.Tensor:
    """Algorithm 1 of Frantar et al. without the lazy blocks, one column at a time, written out
    here independently of mtool.quantize.gptq (only the min/max grid is shared)."""
    W, n = w.clone(), w.shape[1]
    gs = n if gs == -1 else gs
    Hd = h + damp * h.diag().mean() * torch.eye(n)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    Q = torch.zeros_like(W)
    for j in range(n):
        if j % gs == 0:
            s, z = grid(W[:, j : j + gs], bits, True)
        q = torch.clamp(torch.round(W[:, j] / s) + z, 0, 2**bits - 1)
        Q[:, j] = (q - z) * s
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= err.unsqueeze(1) * Hinv[j, j:].unsqueeze(0)
    return Q


@pytest.mark.parametrize("cols,gs", [(320, 64), (384, 128), (320, 96), (300, -1), (512, 256)])
def test_gptq_is_the_papers_algorithm(cols, gs):
    """Groups inside a block, one per block, across block edges, one for the whole row, over two blocks."""
    g = torch.Generator().manual_seed(cols + gs)
    w = torch.randn(48, cols, generator=g)
    x = torch.randn(2000, cols, generator=g) @ torch.randn(cols, cols, generator=g)  # correlated inputs
    h = Hessian(cols)
    h.add(x)
    ours, _ = gptq(w, h, 4, gs, True, damp=0.01)
    ref = _paper_gptq(w, h.h, 4, gs, 0.01)
    codes = torch.round(ours.dequant / ours.scales[ours.g_idx].t()) + ours.zeros[ours.g_idx].t()
    assert torch.equal(ours.codes.t().double(), codes.double())  # codes, grids and values agree
    same = (ours.dequant - ref).abs() < 1e-4
    assert same.float().mean() > 0.995  # float rounding may flip a handful of near-ties
    err_ours = float(((x @ (w - ours.dequant).t()) ** 2).mean())
    err_ref = float(((x @ (w - ref).t()) ** 2).mean())
    assert err_ours == pytest.approx(err_ref, rel=0.02)


def test_memo_never_replays_a_module_called_twice_per_forward():
    """A module used twice in one forward (with different inputs) is not recorded: replaying one
    output per batch would hand the second call the first call's result."""

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)
            self.last = torch.nn.Linear(4, 4)

        def forward(self, x):
            a = self.inner(x)
            return self.last(a + self.inner(a))

    torch.manual_seed(0)
    m = Twice()
    memo = engine.OutputMemo(m, ["inner", "last"], budget=1 << 30)
    xs = [torch.randn(2, 4) for _ in range(3)]
    memo.finish(["inner"])
    for _ in range(2):  # the pass that would record, then one that would replay
        with memo.pass_():
            outs = []
            for k, x in enumerate(xs):
                memo.batch = k
                outs.append(m(x))
        for x, y in zip(xs, outs):
            a = m.inner(x)
            torch.testing.assert_close(y, m.last(a + m.inner(a)))
    assert "inner" in memo.unkept and not memo.outs


def _published_clip(w: torch.Tensor, xs: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """AutoAWQ's _compute_best_clip as published (one broadcast over all rows, tokens and columns)."""
    out_f, in_f = w.shape
    wg = w.reshape(out_f, 1, in_f // group, group)
    xg = xs.reshape(1, xs.shape[0], in_f // group, group)
    org = (xg * wg).sum(-1)
    org_max = wg.abs().amax(dim=-1, keepdim=True)
    best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(10):
        mx = org_max * (1 - i / 20)
        q = engine._awq_fake_quant(torch.clamp(wg, -mx, mx).reshape(out_f, in_f), bits, group).reshape(wg.shape)
        err = ((xg * q).sum(-1) - org).pow(2).mean(dim=1).view(best_err.shape)
        better = err < best_err
        best_err[better], best_max[better] = err[better], mx[better]
    return torch.clamp(wg, -best_max, best_max).reshape(out_f, in_f)


def test_awq_clip_search_in_row_blocks_is_the_published_search():
    """The row-blocked batched-matmul clip search picks the clips of the published broadcast (which
    needed out x tokens x in floats: 46 GB for a 7B down_proj); several row blocks, odd row count."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(203, 256, generator=g) * torch.rand(1, 256, generator=g) * 3
    x = torch.randn(2, 150, 256, generator=g) * torch.rand(256, generator=g) * 2
    want = _published_clip(w, x.reshape(-1, 256), 4, 64)
    got = engine._search_clip(w, x, 4, 64, chunk_bytes=4 * 4 * 300 * 50)  # 50 rows per block
    assert not torch.equal(want, w)  # the search clipped something
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("desc_act", [False, True])
def test_stacked_solve_gives_each_linear_its_own_result(desc_act):
    """q/k/v (or gate/up, or experts' w1/w3) share a Hessian: solved stacked, each keeps the result of
    its own solve (rows are independent given H; float sums in another blocking may flip a near-tie)."""
    from mtool.quantize.gptq import gptq_stacked

    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(n, 384, generator=g) * sc for n, sc in ((256, 1.0), (64, 0.1), (96, 3.0))]
    x = torch.randn(1500, 384, generator=g) @ torch.randn(384, 384, generator=g)
    h = Hessian(384)
    h.add(x)
    stacked = gptq_stacked(ws, h, 4, 128, False, desc_act=desc_act)
    for w, r in zip(ws, stacked):
        alone, _ = gptq(w, h, 4, 128, False, desc_act=desc_act)
        assert r.codes.shape == alone.codes.shape and r.scales.shape == alone.scales.shape
        assert torch.equal(r.g_idx, alone.g_idx)
        assert float((r.codes == alone.codes).double().mean()) > 0.999
        torch.testing.assert_close(r.scales, alone.scales, rtol=1e-4, atol=1e-6)
        assert r.codes.is_contiguous() and r.zeros.is_contiguous()


def test_awq_holds_one_experts_activations_at_a_time(mixtral_model, monkeypatch):
    """AWQ reads each expert's w2 input (every token's ffn-wide activation): held one expert at a
    time, not all of the layer's (44 GB of GPU memory at a real-size Mixtral layer)."""
    model = load_canonical(mixtral_model)
    ids = calibration_ids(model.tokenizer_dir, None, 4, 32)
    n_ff = model.config["intermediate_size"]
    held, apply = [], engine._AwqLayer.apply

    def watch(self, mapping, s):
        apply(self, mapping, s)
        transient = getattr(self, "transient", None)
        feats = list(self.feats.values()) + ([transient[1]] if transient else [])
        held.append(sum(t is not None and t.shape[-1] == n_ff for t in feats))

    monkeypatch.setattr(engine._AwqLayer, "apply", watch)
    s = QuantSettings("awq", bits=4, group_size=32, batch=2)
    for *_, rep in iter_quantized_layers(model, ids, s):
        pass
    assert len(held) >= 2 and max(held) == 1  # the expert just smoothed, whatever the number of experts
