"""TeleChat 12B-, 7B- (tied, no prefix) and 52B-shaped checkpoints against an independent reference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mtool.cli import cli
from mtool.model.families import load_canonical
from mtool.convert.gguf_export import export_gguf
from mtool.convert.hf_export import export_hf
from mtool.errors import MtoolError

from .helpers import llamacpp_logits, mean_kld
from .telechat_reference import reference_logits, write_telechat

VARIANTS = ["12b", "7b", "52b"]
IDS = [1] + list(range(3, 130))


@pytest.fixture(scope="module")
def telechat(tmp_path_factory):
    root = tmp_path_factory.mktemp("telechat")
    return {v: write_telechat(root / v, v, seed=11 + i) for i, v in enumerate(VARIANTS)}


@pytest.fixture(scope="module")
def reference(telechat):
    return {v: reference_logits(telechat[v], IDS).numpy() for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_export_loads_as_plain_llama(variant, telechat, reference, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = export_hf(load_canonical(telechat[variant]), tmp_path / "llama", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in cfg
    model = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].double().numpy()
    ref = reference[variant]
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    print(f"telechat {variant} --to hf: max rel err {rel:.2e}")
    assert rel < 1e-5
    tok = AutoTokenizer.from_pretrained(str(out))  # no remote code needed
    assert tok("你好 world")["input_ids"][0] == 1
    if variant != "52b":  # TeleChat 7B/12B lack q/k/v/gate/up biases: they are written as zeros
        sd = load_file(str(out / "model.safetensors"))
        assert torch.count_nonzero(sd["model.layers.0.self_attn.q_proj.bias"]) == 0
        assert torch.count_nonzero(sd["model.layers.0.self_attn.o_proj.bias"]) > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_gguf_matches_reference(variant, telechat, reference, tmp_path):
    ref = reference[variant]
    f32 = tmp_path / "f32.gguf"
    export_gguf(load_canonical(telechat[variant]), f32, outtype="f32", progress=False)
    cand = llamacpp_logits(f32, IDS)
    rel = np.abs(cand - ref).max() / np.abs(ref).max()
    assert rel < 1e-3
    assert (cand.argmax(-1) == ref.argmax(-1)).all()
    q8 = tmp_path / "q8.gguf"
    export_gguf(load_canonical(telechat[variant]), q8, outtype="q8_0", progress=False)
    kld = mean_kld(ref, llamacpp_logits(q8, IDS))
    print(f"telechat {variant}: f32 max rel {rel:.2e}, q8_0 mean KLD {kld:.2e}")
    assert kld < 5e-3


def test_52b_check_fails_without_mup(telechat, reference, tmp_path, monkeypatch):
    from mtool.model.families import telechat as tc

    monkeypatch.setattr(tc, "_mup_factors", lambda src: (1.0, 1.0))
    out = export_hf(load_canonical(telechat["52b"]), tmp_path / "nomup", progress=False)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([IDS])).logits[0].double().numpy()
    ref = reference["52b"]
    assert np.abs(logits - ref).max() / np.abs(ref).max() > 1e-2


def test_verify_accepts_telechat_reference(telechat, tmp_path):
    # f16: the untrained reference has near-tied logits, where q8_0 flips top-1 by chance
    out = tmp_path / "tc.gguf"
    r = CliRunner().invoke(cli, ["convert", str(telechat["12b"]), "-o", str(out), "--outtype", "f16", "-q"])
    assert r.exit_code == 0, r.output
    js = tmp_path / "v.json"
    r = CliRunner().invoke(cli, ["verify", str(telechat["12b"]), str(out), "--json", str(js), "--ctx", "128"])
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert rep["passed"] and rep["tokenization"]["match"]


def test_key_value_size_mismatch_is_named(telechat, tmp_path):
    src = tmp_path / "bad"
    shutil.copytree(telechat["12b"], src)
    sd = load_file(str(src / "model.safetensors"))
    sd["transformer.h.1.self_attention.key_value.weight"] = sd["transformer.h.1.self_attention.key_value.weight"][:192]
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MtoolError, match=r"transformer\.h\.1\.self_attention\.key_value\.weight has shape \[192, 128\]"):
        load_canonical(src)


def test_convert_to_hf_cli_refuses_overwrite(telechat, tmp_path):
    out = tmp_path / "hf"
    assert CliRunner().invoke(cli, ["convert", str(telechat["7b"]), "-o", str(out), "--to", "hf", "-q"]).exit_code == 0
    r = CliRunner().invoke(cli, ["convert", str(telechat["7b"]), "-o", str(out), "--to", "hf", "-q"])
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = CliRunner().invoke(cli, ["convert", str(telechat["7b"]), "-o", str(out), "--to", "hf", "-q", "--force"])
    assert r.exit_code == 0, r.output
    assert not [p for p in tmp_path.iterdir() if "mtool" in p.name]


@pytest.mark.parametrize("variant", ["7b", "52b"])
def test_inspect_shows_telechat_sizes(variant, telechat):
    """TeleChat's config names its sizes its own way; inspect shows them normalized."""
    import json as _json

    from click.testing import CliRunner

    from mtool.cli import cli

    r = CliRunner().invoke(cli, ["inspect", str(telechat[variant]), "--json"])
    assert r.exit_code == 0, r.stderr
    s = _json.loads(r.output)
    cfg = _json.loads((telechat[variant] / "config.json").read_text())
    assert s["config"]["hidden_size"] == cfg.get("hidden_size", cfg.get("n_embd"))
    assert s["config"]["num_hidden_layers"] == cfg.get("n_layer", cfg.get("num_hidden_layers"))
    assert s["family"].startswith("telechat")
