"""GPTQ / AWQ on a trained tiny Llama: quality vs round-to-nearest, formats, verify, TeleChat, bad input.

The model is trained on a seeded synthetic bilingual corpus (tests/synthetic.py: template
sentences, copying and counting). Tiny models trained for seconds do not develop the activation
outliers that make round-to-nearest costly in real LLMs (here RTN would cost ~0.1 % at 4 bits), so
the fixture then applies an exact, function-preserving rescaling that creates them: a few RMSNorm
channels x16 and the matching input columns of the following linears / 16. The test asserts the
float model computes the same logits before and after.
"""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mtool.cli import cli
from mtool.model.families import load_canonical
from mtool.quantize.engine import QuantSettings
from mtool.quantize.export import export_quantized
from mtool.verify.quantized import QuantizedRunner

from .moe_routing import kld, mixtral_routing
from .synthetic import corpus
from .telechat_reference import reference_logits, write_telechat

HIDDEN, FFN, VOCAB, SEQ = 128, 384, 400, 128


def _train(out, steps: int = 600):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True)
    train = corpus(6000, 1)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(train.splitlines()), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                           "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))
    ids = torch.tensor(AutoTokenizer.from_pretrained(str(out))(train, add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.stack([ids[i : i + SEQ] for i in torch.randint(0, len(ids) - SEQ - 1, (16,), generator=g)])
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out))
    (out / "calib.txt").write_text(corpus(600, 3))
    return out


def _add_outliers(src, dst):
    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        p = f"model.layers.{i}"
        for norm, lins in (("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                           ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"])):
            ch = torch.randperm(HIDDEN, generator=g)[:4]
            sd[f"{p}.{norm}.weight"][ch] *= 16
            for lin in lins:
                sd[f"{p}.{lin}.weight"][:, ch] /= 16
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    return _add_outliers(_train(root / "plain"), root / "model")


@pytest.fixture(scope="module")
def held_out(trained):
    from transformers import AutoTokenizer

    ids = torch.tensor(AutoTokenizer.from_pretrained(str(trained))(corpus(600, 2), add_special_tokens=False)["input_ids"])
    return ids[: (len(ids) // SEQ) * SEQ].view(-1, SEQ)[:40]


def _ppl(model, wins) -> float:
    with torch.no_grad():
        return math.exp(model(input_ids=wins, labels=wins).loss.item())


def _quantize(src, out, method, bits, group=128, **kw):
    sym = kw.pop("sym", method != "awq" and bits != 2)
    s = QuantSettings(method, bits=bits, group_size=group, sym=sym, **kw)
    return export_quantized(load_canonical(src), out, s, calib=src / "calib.txt", nsamples=32, seqlen=SEQ, progress=False)


def test_outlier_rescaling_preserves_the_model(trained, held_out):
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(str(trained.parent / "plain"), dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(a(held_out[:2]).logits, b(held_out[:2]).logits, rtol=1e-4, atol=1e-4)


def test_gptq_and_awq_beat_round_to_nearest(trained, held_out, tmp_path):
    from transformers import AutoModelForCausalLM

    fp = _ppl(AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32), held_out)
    ppl = {}
    for method, bits in (("rtn", 4), ("gptq", 4), ("awq", 4), ("rtn", 2), ("gptq", 2)):
        out = tmp_path / f"{method}{bits}"
        _quantize(trained, out, method, bits)
        ppl[(method, bits)] = _ppl(QuantizedRunner(out, "cpu").model, held_out)
    print(f"\nheld-out perplexity: fp {fp:.4f}; " + "; ".join(f"{m} {b}-bit {p:.4f} ({100 * (p / fp - 1):+.2f} %)"
                                                            for (m, b), p in ppl.items()))
    assert ppl[("rtn", 4)] > fp * 1.004  # round-to-nearest visibly costs perplexity
    assert ppl[("gptq", 4)] < ppl[("rtn", 4)]
    assert ppl[("awq", 4)] < ppl[("rtn", 4)]
    assert ppl[("gptq", 2)] < ppl[("rtn", 2)]


def test_gptq_8bit_kld_and_format(trained, held_out, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "g8"
    _quantize(trained, out, "gptq", 8, group=64, desc_act=True)
    fp = AutoModelForCausalLM.from_pretrained(str(trained), dtype=torch.float32)
    q = QuantizedRunner(out, "cpu").model
    with torch.no_grad():
        lp, lq = (torch.log_softmax(m(held_out[:8]).logits.double(), -1) for m in (fp, q))
    kld = float(torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).mean())
    print(f"gptq 8-bit mean KLD {kld:.2e}")
    assert kld < 1e-2
    # tensor-level checks against the GPTQ v1 layout
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc == json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 8 and qc["group_size"] == 64 and qc["desc_act"] is True and qc["checkpoint_format"] == "gptq"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        p = "model.layers.0.mlp.down_proj"
        assert f.get_slice(f"{p}.qweight").get_dtype() == "I32" and f.get_slice(f"{p}.qweight").get_shape() == [FFN * 8 // 32, HIDDEN]
        assert f.get_slice(f"{p}.qzeros").get_shape() == [FFN // 64, HIDDEN * 8 // 32]
        assert f.get_slice(f"{p}.scales").get_dtype() == "F16" and f.get_slice(f"{p}.scales").get_shape() == [FFN // 64, HIDDEN]
        g_idx = f.get_tensor(f"{p}.g_idx")
        assert g_idx.dtype == torch.int32 and sorted(torch.bincount(g_idx).tolist()) == [64] * (FFN // 64)
        assert f.get_slice("lm_head.weight").get_dtype() == "F16" and "model.layers.0.mlp.down_proj.weight" not in f.keys()


def test_awq_format_and_cli_verify(trained, tmp_path):
    out = tmp_path / "awq"
    r = CliRunner().invoke(cli, ["convert", str(trained), "-o", str(out), "--to", "awq", "--group-size", "64",
                                 "--calib", str(trained / "calib.txt"), "--nsamples", "16", "-q"])
    assert r.exit_code == 0, r.output
    assert "relative output error" in r.output
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "awq" and cfg["version"] == "gemm" and cfg["zero_point"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        p = "model.layers.1.self_attn.o_proj"
        assert f.get_slice(f"{p}.qweight").get_shape() == [HIDDEN, HIDDEN // 8]
        assert f.get_slice(f"{p}.qzeros").get_shape() == [HIDDEN // 64, HIDDEN // 8]
        assert f"{p}.g_idx" not in f.keys()
    js = tmp_path / "v.json"
    r = CliRunner().invoke(cli, ["verify", str(trained), str(out), "--json", str(js), "--ctx", "128", "--max-windows", "4"])
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert rep["artifact_type"] == "awq-4bit" and rep["passed"] and rep["metrics"]["kld_mean"] > 0


def test_telechat_gptq_verifies_against_reference(tmp_path):
    src = write_telechat(tmp_path / "tc", "12b", seed=5)
    out = tmp_path / "tc-gptq"
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "--to", "gptq", "--bits", "8", "--group-size", "32",
                                 "--nsamples", "8", "--seqlen", "64", "-q"])
    assert r.exit_code == 0, r.output
    ids = [1] + list(range(3, 100))
    ref = reference_logits(src, ids)
    with torch.no_grad():
        cand = QuantizedRunner(out, "cpu").model(torch.tensor([ids])).logits[0].double()
    kld = torch.nn.functional.kl_div(torch.log_softmax(cand, -1), torch.log_softmax(ref, -1), log_target=True,
                                     reduction="none").sum(-1).mean()
    assert float(kld) < 1e-3
    r = CliRunner().invoke(cli, ["verify", str(src), str(out), "--ctx", "128", "--max-windows", "4"])
    assert r.exit_code == 0, r.output


def test_bad_quantization_input(trained, tmp_path):
    out = tmp_path / "o"
    cases = [
        (["--to", "gptq", "--bits", "5"], "GPTQ stores 2, 3, 4, 8 bits, not 5"),
        (["--to", "gptq", "--group-size", "48"], "group size must be one of"),
        (["--to", "awq", "--bits", "8"], "AWQ GEMM format stores 4 bits"),
        (["--to", "gptq", "--nsamples", "500", "--seqlen", "512", "--calib", str(trained / "calib.txt")], "too short"),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(cli, ["convert", str(trained), "-o", str(out), *args, "-q"])
        assert r.exit_code == 2 and msg in r.stderr, (args, r.stderr)
        assert not out.exists()


def test_gptqmodel_loader_matches_our_dequantizer(trained, tmp_path):
    gptqmodel = pytest.importorskip("gptqmodel")  # optional extra; the tests above do not depend on it
    out = tmp_path / "g4"
    _quantize(trained, out, "gptq", 4)
    ids = torch.tensor([[1] + list(range(3, 60))])
    with torch.no_grad():
        ours = QuantizedRunner(out, "cpu").model(ids).logits.double()
        theirs = gptqmodel.GPTQModel.load(str(out), device="cpu", dtype=torch.float32)(ids).logits.double()
    kld = torch.nn.functional.kl_div(torch.log_softmax(theirs, -1), torch.log_softmax(ours, -1), log_target=True,
                                     reduction="none").sum(-1).mean()
    print(f"GPTQModel vs mtool dequantizer: max |dlogit| {float((ours - theirs).abs().max()):.3f} "
          f"(logits up to {float(ours.abs().max()):.1f}), mean KLD {float(kld):.2e}")
    # GPTQModel computes in bfloat16 on CPU here: allow 2 % of the logit range, and require KLD and top-1 agreement
    assert float((ours - theirs).abs().max()) < 0.02 * float(ours.abs().max())
    assert float(kld) < 1e-3 and bool((ours.argmax(-1) == theirs.argmax(-1)).all())


# The fixture Mixtral is trained for 30 steps only: its predictions are soft, and many positions have
# near-tied top logits that flip under 4-bit noise while the distributions barely move. For it, mean
# KLD and the PPL ratio keep the 4-bit defaults; top-1 agreement is checked at 70 % instead of 85 %.
MOE_THRESHOLDS = ["--max-kld", "0.1", "--max-ppl-ratio", "1.1", "--min-top1", "0.70"]


@pytest.mark.parametrize("method,naming", [("gptq", "legacy"), ("awq", "legacy"), ("gptq", "gptqmodel")])
def test_moe_every_expert_quantized_router_kept(method, naming, mixtral_model, tmp_path):
    from mtool.quantize.export import export_quantized as run

    out = tmp_path / f"moe-{method}"
    reports = []
    s = QuantSettings(method, bits=4, group_size=128, sym=method == "gptq")
    run(load_canonical(mixtral_model), out, s, nsamples=16, seqlen=128, progress=False,
        on_layer=reports.append, expert_naming=naming)
    for rep in reports:
        assert rep.stat_tokens == 16 * 128  # every calibration token visited every expert
        assert len(rep.expert_tokens) == 8 and sum(rep.expert_tokens) == 2 * 16 * 128  # top-2 routing
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for i in range(2):
            for e in range(8):
                for w, fused in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                    name = (f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}" if naming == "legacy"
                            else f"model.layers.{i}.mlp.experts.{e}.{fused}")
                    assert f"{name}.qweight" in keys and f"{name}.weight" not in keys
            router = f"model.layers.{i}.block_sparse_moe.gate" if naming == "legacy" else f"model.layers.{i}.mlp.gate"
            assert f.get_slice(f"{router}.weight").get_dtype() == "F16" and f"{router}.qweight" not in keys
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    if method == "awq":
        assert cfg["quantization_config"]["modules_to_not_convert"] == ["gate"]
    r = CliRunner().invoke(cli, ["verify", str(mixtral_model), str(out), "--ctx", "128", *MOE_THRESHOLDS])
    assert r.exit_code == 0, r.output


def test_moe_gap_under_bf16_kernels_is_routing(mixtral_model, tmp_path):
    """Why GPTQModel's loader agrees with our dequantizer to KLD ~5e-3 on the tiny Mixtral but ~1e-4 on
    dense models (found with GPTQModel 7.6.0, bench/gptqmodel_moe_parity.py): its CPU kernel works in
    bfloat16 (scales, zeros, activations), which moves the weights it applies by ~0.5 % of a row's range;
    the checkpoint itself matches (no expert-order, naming or packing error: those move weights by
    their whole size). That perturbation flips one of the top-2 experts for a few % of the tokens of a
    router trained for 30 steps, and the flips are the gap: here the same bf16 rounding applied to our
    own dequantized weights gives the gap with free routing and ~nothing with the routing held fixed."""
    out = tmp_path / "moe-gptq"
    export_quantized(load_canonical(mixtral_model), out, QuantSettings("gptq", bits=4, group_size=128, sym=True),
                     nsamples=16, seqlen=128, progress=False, expert_naming="gptqmodel")
    model = QuantizedRunner(out, "cpu").model
    ids = torch.tensor([[1] + list(range(3, 200))])
    with mixtral_routing() as routing, torch.no_grad():
        exact = model(ids).logits
        ours_routes = routing.take()
        for n, p in model.model.layers.named_parameters():
            if p.dim() >= 2 and not n.endswith("mlp.gate.weight"):  # the linears' weights (the router stays f32)
                p.copy_(p.to(torch.bfloat16).float())
        free = model(ids).logits
        flipped = routing.rerouted(ours_routes, routing.take())
        routing.hold(ours_routes)
        held = model(ids).logits
    assert max(flipped) > 0  # some tokens went to another expert
    kld_free, kld_held = kld(exact, free), kld(exact, held)
    print(f"bf16 weights: KLD {kld_free:.2e} with free routing ({flipped} of tokens re-routed), "
          f"{kld_held:.2e} with the routing held")
    assert kld_held < 1e-3 and kld_free > 5 * kld_held
