"""mtool merge: exact where it must be, equal to independently computed averages, streaming, checked."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from mtool.cli import cli
from mtool.merge import MergeSpec, run_merge
from mtool.merge.methods import merge_tensor
from mtool.tiny import TinySpec, make_tiny_llama

from .conftest import MIXTRAL_SPEC
from .telechat_reference import write_telechat


def _sd(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three same-shape bf16 Llamas with the same tokenizer (different seeds)."""
    root = tmp_path_factory.mktemp("merge")
    return [make_tiny_llama(root / f"m{i}", TinySpec(kv_heads=2, tied=False, dtype="bfloat16", seed=20 + i)) for i in range(3)]


def _merge(args, expect=0):
    r = CliRunner().invoke(cli, ["merge", *map(str, args), "-q"])
    assert r.exit_code == expect, r.output + (r.stderr if expect == 0 else "")
    return r


def test_linear_merge_of_identical_checkpoints_is_exact(three, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(three[0], copy)
    out = tmp_path / "out"
    _merge([three[0], copy, "-o", out, "--weights", "0.3,0.7"])
    a, m = _sd(three[0]), _sd(out)
    assert a.keys() == m.keys()
    for k in a:
        assert m[k].dtype == torch.bfloat16 and torch.equal(a[k], m[k]), k


def test_linear_merge_equals_weighted_average(three, tmp_path):
    out = tmp_path / "out"
    _merge([*three, "-o", out, "--weights", "0.5,0.3,0.2", "--dtype", "float32"])
    sds, m = [_sd(d) for d in three], _sd(out)
    for k in sds[0]:
        expect = (0.5 * sds[0][k].float() + 0.3 * sds[1][k].float() + 0.2 * sds[2][k].float()) / 1.0
        torch.testing.assert_close(m[k], expect, rtol=1e-6, atol=1e-7)


def test_unnormalized_and_recipe_recorded(three, tmp_path):
    out = tmp_path / "out"
    _merge([three[0], three[1], "-o", out, "--weights", "1,1", "--no-normalize", "--dtype", "float32"])
    a, b, m = _sd(three[0]), _sd(three[1]), _sd(out)
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(m[k], a[k].float() + b[k].float(), rtol=1e-6, atol=1e-7)
    recipe = json.loads((out / "mtool_merge.json").read_text())
    assert recipe["method"] == "linear" and [m["weight"] for m in recipe["models"]] == [1.0, 1.0]
    assert recipe["parameters"]["normalize"] is False
    assert "mtool merge" in (out / "README.md").read_text()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert [m["model"] for m in json.loads(f.metadata()["mtool_merge"])["models"]] == [str(three[0]), str(three[1])]
    assert (out / "tokenizer.model").read_bytes() == (three[0] / "tokenizer.model").read_bytes()
    # the record is a config: replaying it gives the same weights
    replay = tmp_path / "replay"
    _merge(["--config", out / "mtool_merge.json", "-o", replay])
    r = _sd(replay)
    assert r.keys() == m.keys() and all(torch.equal(r[n], m[n]) for n in m)


def test_slerp_endpoints_and_midpoint(three, tmp_path):
    a, b = _sd(three[0]), _sd(three[1])
    for t, expect in ((0.0, a), (1.0, b)):
        out = tmp_path / f"s{t}"
        _merge([three[0], three[1], "-o", out, "--method", "slerp", "--t", str(t)])
        m = _sd(out)
        assert all(torch.equal(m[k], expect[k]) for k in a)
    # midpoint of two orthogonal unit vectors lies on the arc: norm 1, equal angles
    x, y = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = merge_tensor("slerp", [x, y], None, [1, 1], normalize=True, t=0.5, density=1, lam=1, gen=torch.Generator())
    torch.testing.assert_close(mid, torch.tensor([2**-0.5, 2**-0.5]))


def test_ties_by_hand():
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, -2.0, 0.1, 3.0]), torch.tensor([2.0, 1.0, -0.2, -1.0])]
    out = merge_tensor("ties", xs, base, [1.0, 1.0], normalize=True, t=0.5, density=0.5, lam=1.0, gen=torch.Generator())
    # trim keeps the 2 largest |delta| of each: [0,-2,0,3] and [2,1,0,0]; elected signs: +,-,0,+
    # disjoint mean: [2, -2, 0, 3]
    torch.testing.assert_close(out, torch.tensor([2.0, -2.0, 0.0, 3.0]))


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "task_arithmetic"])
def test_task_vector_methods_are_deterministic(method, three, tmp_path):
    outs = []
    for i, seed in enumerate((7, 7, 8)):
        out = tmp_path / f"o{i}"
        _merge([three[1], three[2], "-o", out, "--method", method, "--base", three[0], "--seed", seed, "--density", "0.5"])
        outs.append(_sd(out))
    k = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(outs[0][k], outs[1][k])
    if method.startswith("dare"):
        assert not torch.equal(outs[0][k], outs[2][k])
    else:
        assert torch.equal(outs[0][k], outs[2][k])


def test_merge_streams_a_few_tensors_at_a_time(three, tmp_path, monkeypatch):
    """Bounded memory: at no point are more than one tensor per source (+ the result) alive."""
    import weakref

    from mtool.model import checkpoint

    live, peak = set(), [0]
    original = checkpoint.CheckpointReader.load

    def tracking_load(self, name):
        t = original(self, name)
        key = id(t)
        live.add(key)
        weakref.finalize(t, live.discard, key)
        peak[0] = max(peak[0], len(live))
        return t

    monkeypatch.setattr(checkpoint.CheckpointReader, "load", tracking_load)
    run_merge(MergeSpec(sources=list(three)), tmp_path / "out", progress=False)
    n_tensors = len(_sd(three[0]))
    assert n_tensors > 10
    assert peak[0] <= len(three) + 1


def test_mixtral_merge_loads_in_transformers(tmp_path):
    from dataclasses import replace

    from transformers import MixtralForCausalLM

    a = make_tiny_llama(tmp_path / "a", replace(MIXTRAL_SPEC, train_steps=0, seed=1))
    b = make_tiny_llama(tmp_path / "b", replace(MIXTRAL_SPEC, train_steps=0, seed=2))
    out = tmp_path / "out"
    _merge([a, b, "-o", out])
    sa, sb, m = _sd(a), _sd(b), _sd(out)
    k = "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    torch.testing.assert_close(m[k], (sa[k] + sb[k]) / 2, rtol=1e-6, atol=1e-7)
    MixtralForCausalLM.from_pretrained(str(out))


def test_telechat_merge_canonical_and_original(tmp_path):
    a, b = write_telechat(tmp_path / "a", "12b", seed=1), write_telechat(tmp_path / "b", "12b", seed=2)
    out = tmp_path / "canon"
    _merge([a, b, "-o", out])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    sa, sb, m = _sd(a), _sd(b), _sd(out)
    kv = "transformer.h.0.self_attention.key_value.weight"
    k_avg = ((sa[kv] + sb[kv]) / 2).reshape(4, 2, 32, 128)[:, 0].reshape(128, 128)
    torch.testing.assert_close(m["model.layers.0.self_attn.k_proj.weight"], k_avg, rtol=1e-6, atol=1e-7)
    orig = tmp_path / "orig"
    _merge([a, b, "-o", orig, "--layout", "original"])
    cfg = json.loads((orig / "config.json").read_text())
    assert cfg["architectures"] == ["TelechatForCausalLM"] and "auto_map" in cfg
    torch.testing.assert_close(_sd(orig)[kv], (sa[kv] + sb[kv]) / 2, rtol=1e-6, atol=1e-7)


def test_yaml_config_with_per_tensor_filters(three, tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        "method: linear\n"
        f"models:\n  - {{model: {three[0]}, weight: 0.5}}\n  - {{model: {three[1]}, weight: 0.5}}\n"
        "dtype: float32\n"
        "filters:\n  - {pattern: 'self_attn', weights: [1.0, 0.0]}\n  - {pattern: 'mlp', weights: [0.0, 1.0]}\n"
    )
    out = tmp_path / "out"
    _merge(["-o", out, "--config", cfg])
    a, b, m = _sd(three[0]), _sd(three[1]), _sd(out)
    assert torch.equal(m["model.layers.0.self_attn.o_proj.weight"], a["model.layers.0.self_attn.o_proj.weight"].float())
    assert torch.equal(m["model.layers.0.mlp.down_proj.weight"], b["model.layers.0.mlp.down_proj.weight"].float())
    k = "model.norm.weight"
    torch.testing.assert_close(m[k], (a[k].float() + b[k].float()) / 2, rtol=1e-6, atol=1e-7)


def test_bad_merges_are_refused_before_any_work(three, tmp_path):
    other = make_tiny_llama(tmp_path / "wide", TinySpec(kv_heads=2, tied=False, intermediate=320, dtype="bfloat16"))
    bpe = make_tiny_llama(tmp_path / "bpe", TinySpec(tokenizer="bpe", tokenizer_vocab=700, kv_heads=2, tied=False,
                                                     dtype="bfloat16"))
    out = tmp_path / "out"
    cases = [
        ([three[0], other], "model.layers.0.mlp.gate_proj.weight has shape [256, 128]"),
        ([three[0], bpe], "tokenizers differ"),
        ([three[0], three[1], "--weights", "0.5,0.3,0.2"], "3 weights given for 2 sources"),
        ([three[0], three[1], "--method", "ties"], "needs --base"),
        ([three[0], three[1], three[2], "--method", "slerp"], "exactly two"),
        ([three[0]], "at least two"),
    ]
    for args, msg in cases:
        r = _merge([*args, "-o", out], expect=2)
        assert msg in r.stderr, (msg, r.stderr)
        assert not out.exists()
    inside = three[0] / "merged"
    r = _merge([three[0], three[1], "-o", inside], expect=2)
    assert "inside the source" in r.stderr and not inside.exists()
    # an explicit tokenizer source allows differing tokenizers
    _merge([three[0], bpe, "-o", out, "--tokenizer-source", three[0]])
    assert (out / "tokenizer.model").is_file()
