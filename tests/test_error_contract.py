"""The error contract, class by class, through the CLI.

Every failure that is not a verification verdict: exit 2, exactly one line `error: ...` on
stderr naming the file or option, no traceback, nothing left beside OUT, inputs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mtool.cli import cli


def sha_tree(path):
    h = hashlib.sha256()
    paths = sorted(path.rglob("*")) if path.is_dir() else [path]
    for p in paths:
        if p.is_file():
            h.update(str(p.relative_to(path.parent)).encode() + p.read_bytes())
    return h.hexdigest()


def run(*args, inputs=()):
    """Invoke the CLI; checks that no input changed."""
    before = {p: sha_tree(p) for p in inputs}
    r = CliRunner().invoke(cli, [str(a) for a in args])
    for p, digest in before.items():
        assert sha_tree(p) == digest, f"{p} was modified"
    return r


def assert_error(r, match, out=None):
    assert r.exit_code == 2, (r.exit_code, r.output, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    assert match in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], list(out.parent.iterdir())


@pytest.fixture
def src(gqa_model, tmp_path):
    d = tmp_path / "src"
    shutil.copytree(gqa_model, d)
    return d


def _poison(d, name="model.layers.1.mlp.down_proj.weight"):
    sd = load_file(d / "model.safetensors")
    sd[name][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})


# -- data loss -----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["contains", "equals"])
def test_output_containing_or_equal_to_source_is_refused_even_with_force(src, how):
    out = src.parent if how == "contains" else src
    for args in (["convert", src, "-o", out, "--to", "hf", "--force"],
                 ["convert", src, "-o", out, "--to", "gptq", "--force"],
                 ["merge", src, src, "-o", out, "--force"],
                 ["extend-vocab", src, "-o", out, "--special", "<x>", "--force"]):
        r = run(*args, inputs=[src])
        assert r.exit_code == 2 and "choose an output outside every input" in r.stderr, (args, r.stderr)
        assert src.is_dir()


def test_output_equal_to_an_input_file_is_refused(src, tmp_path):
    words = tmp_path / "w.txt"
    words.write_text("检查点\n", encoding="utf-8")
    r = run("extend-vocab", src, "-o", words, "--tokens", words, "--force", inputs=[src, words])
    assert_error(r, "is the input")


def test_symlinked_output_into_source_is_refused(src, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(src)
    r = run("convert", src, "-o", link / "sub", "--to", "hf", inputs=[src])
    assert_error(r, "outside every input")


# -- silent corruption -----------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["--to", "hf"], ["--to", "gptq", "--group-size", "32", "--nsamples", "4", "--seqlen", "64"],
    ["--to", "awq", "--group-size", "32", "--nsamples", "4", "--seqlen", "64"], ["--outtype", "q8_0"],
])
def test_nan_weight_is_refused_by_every_convert(src, tmp_path, args):
    _poison(src)
    out = tmp_path / ("o.gguf" if "--to" not in args else "o")
    r = run("convert", src, "-o", out, "-q", *args, inputs=[src])
    assert_error(r, "model.layers.1.mlp.down_proj.weight contains NaN", out)


def test_nan_weight_is_refused_by_merge_and_extend_vocab(src, gqa_model, tmp_path):
    _poison(src)
    out = tmp_path / "m"
    assert_error(run("merge", src, gqa_model, "-o", out, "-q", inputs=[src]), "NaN", out)
    assert_error(run("merge", src, gqa_model, "-o", out, "--layout", "original", "-q", inputs=[src]), "NaN", out)
    assert_error(run("extend-vocab", src, "-o", out, "--special", "<x>", "-q", inputs=[src]),
                 "model.layers.1.mlp.down_proj.weight contains NaN", out)


def test_candidate_computing_nan_fails_verify_with_valid_json(src, gqa_model, tmp_path):
    _poison(src)
    js = tmp_path / "v.json"
    r = run("verify", gqa_model, src, "--ctx", "64", "--max-windows", "2", "--json", js, "-q", inputs=[src])
    assert r.exit_code == 1, r.output + r.stderr
    assert "NaN/Inf logits" in r.output
    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    rep = json.loads(js.read_text(), parse_constant=no_constants)  # NaN/Infinity are not JSON
    assert rep["passed"] is False and rep["metrics"]["kld_mean"] is None


def test_reference_computing_nan_is_an_error(src, gqa_model, tmp_path):
    _poison(src)
    r = run("verify", src, gqa_model, "--ctx", "64", "--max-windows", "2", "-q", inputs=[src])
    assert_error(r, "reference")


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_overlapping_safetensors_offsets_are_refused(src, tmp_path):
    f = src / "model.safetensors"
    header, data = _header(f)
    names = [k for k in header if k != "__metadata__"]
    a, b = names[0], names[1]
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b now reads a's bytes
    header[b]["shape"], header[b]["dtype"] = header[a]["shape"], header[a]["dtype"]
    _write_header(f, header, data)
    out = tmp_path / "o.gguf"
    assert_error(run("convert", src, "-o", out, "-q", inputs=[src]), "overlaps", out)


def test_index_pointing_outside_the_model_folder_is_refused(src, tmp_path):
    shutil.move(src / "model.safetensors", tmp_path / "elsewhere.safetensors")
    sd_names = load_file(tmp_path / "elsewhere.safetensors").keys()
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../elsewhere.safetensors" for n in sd_names}}))
    out = tmp_path / "o.gguf"
    assert_error(run("convert", src, "-o", out, "-q"), "outside the model folder", out)


def test_empty_index_and_config_array(src, tmp_path):
    (src / "model.safetensors.index.json").write_text("{}")
    out = tmp_path / "o.gguf"
    assert_error(run("convert", src, "-o", out, "-q"), "no weight_map entries", out)
    (src / "model.safetensors.index.json").unlink()
    (src / "config.json").write_text("[1, 2]")
    assert_error(run("convert", src, "-o", out, "-q"), "must hold a JSON object", out)


def test_garbage_tokenizer_model_is_not_copied(src, tmp_path):
    (src / "tokenizer.model").write_bytes(b"\x00garbage" * 100)
    out = tmp_path / "o"
    assert_error(run("convert", src, "-o", out, "--to", "hf", "-q", inputs=[src]), "not a valid SentencePiece model", out)


def test_legacy_non_zip_bin_is_supported(src, tmp_path):
    sd = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    torch.save(sd, src / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    r = run("convert", src, "-o", tmp_path / "o.gguf", "-q", "--outtype", "f32")
    assert r.exit_code == 0, r.stderr
    r = run("verify", src, tmp_path / "o.gguf", "--ctx", "64", "--max-windows", "2", "-q")
    assert r.exit_code == 0, r.output + r.stderr


def test_pickled_code_in_bin_is_refused_without_bad_advice(src, tmp_path):
    (src / "model.safetensors").unlink()
    torch.save({"model.norm.weight": torch.ones(4), "evil": tmp_path}, src / "pytorch_model.bin")
    r = run("convert", src, "-o", tmp_path / "o.gguf", "-q")
    assert_error(r, "safetensors")
    assert "weights_only=False" not in r.stderr


# -- broken contract: bad files and settings -------------------------------------------------


@pytest.fixture(scope="module")
def good_gguf(gqa_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "m.gguf"
    assert CliRunner().invoke(cli, ["convert", str(gqa_model), "-o", str(out), "-q", "--outtype", "q8_0"]).exit_code == 0
    return out


def test_random_and_truncated_gguf(gqa_model, good_gguf, tmp_path):
    rnd = tmp_path / "r.gguf"
    rnd.write_bytes(bytes(range(256)) * 100)
    assert_error(run("verify", gqa_model, rnd, "-q"), "not a GGUF file")
    assert_error(run("inspect", rnd), "not a GGUF file")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good_gguf.read_bytes()[: good_gguf.stat().st_size * 2 // 3])
    assert_error(run("verify", gqa_model, cut, "-q"), "truncated")
    assert_error(run("inspect", cut), "truncated")


def test_json_destination_checked_before_any_work(gqa_model, good_gguf, tmp_path):
    r = run("verify", gqa_model, good_gguf, "--json", tmp_path / "missing" / "v.json", "-q")
    assert_error(r, "does not exist")
    assert "PASS" not in r.output


@pytest.mark.parametrize("args, match", [
    (["--ctx", "1"], "--ctx"), (["--ctx", "2"], "--ctx"), (["--max-windows", "0"], "--max-windows"),
    (["--ctx", "16", "--max-windows", "1"], "need at least 64"), (["--min-top1", "2"], "--min-top1"),
])
def test_meaningless_verify_settings(gqa_model, good_gguf, args, match):
    assert_error(run("verify", gqa_model, good_gguf, "-q", *args), match)


@pytest.mark.parametrize("content, match", [
    (b"\x00\x01\x02binary\xff", "binary"), (b"\xff\xfe text", "not UTF-8"), (b"", "empty"),
])
def test_bad_data_files(gqa_model, good_gguf, tmp_path, content, match):
    f = tmp_path / "d.txt"
    f.write_bytes(content)
    assert_error(run("verify", gqa_model, good_gguf, "--data", f, "-q"), match)


@pytest.mark.parametrize("line, match", [("{not json", "line 2 is not JSON"), ('["text"]', "line 2 needs a string"),
                                         ('{"text": 5}', "line 2 needs a string")])
def test_malformed_jsonl(gqa_model, good_gguf, tmp_path, line, match):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine"}\n' + line + "\n", encoding="utf-8")
    assert_error(run("verify", gqa_model, good_gguf, "--data", f, "-q"), match)


@pytest.mark.parametrize("args, match", [
    (["--split-max-size", "-5M"], "must be positive"), (["--split-max-size", "lots"], "cannot parse size"),
    (["--to", "hf", "--outtype", "q8_0"], "--outtype does not apply to --to hf"),
    (["--to", "hf", "--bits", "4"], "--bits does not apply"),
    (["--outtype", "q8_0", "--calib", "x.txt"], "--calib does not apply to --to gguf"),
    (["--nsamples", "0", "--to", "gptq"], "--nsamples"),
])
def test_meaningless_convert_settings(src, tmp_path, args, match):
    out = tmp_path / ("o" if "--to" in args else "o.gguf")
    assert_error(run("convert", src, "-o", out, "-q", *args, inputs=[src]), match, out)


def test_gguf_name_for_a_directory_format(src, tmp_path):
    assert_error(run("convert", src, "-o", tmp_path / "x.gguf", "--to", "hf"), "ends in .gguf", tmp_path / "x.gguf")


def test_recipe_with_invalid_jinja(src, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("name: r\nfamily: llama\nchat_template: \"{% for m in messages %}{{ m }\"\n")
    out = tmp_path / "o.gguf"
    assert_error(run("convert", src, "-o", out, "--recipe", rec, "-q"), "not a valid Jinja template", out)


@pytest.mark.parametrize("yaml_text, match", [
    ("method: linear\nmodels: [{model: A, weight: 1}, {model: B, weight: 1}]\nfilters: [{pattern: '(', weights: [1, 1]}]\n",
     "not a valid regular expression"),
    ("method: linear\nmodels: [{model: A, weight: heavy}, {model: B, weight: 1}]\n", "must be a number"),
    ("- just\n- a list\n", "must be a mapping"),
    ("method: [linear\n", "cannot read merge config"),
])
def test_bad_merge_yaml(src, gqa_model, tmp_path, yaml_text, match):
    cfg = tmp_path / "m.yaml"
    cfg.write_text(yaml_text.replace("A", str(src)).replace("B", str(gqa_model)))
    out = tmp_path / "o"
    assert_error(run("merge", "--config", cfg, "-o", out, "-q"), match, out)


def test_internal_error_is_one_line_and_debug_shows_the_traceback(src, tmp_path, monkeypatch):
    import mtool.convert.gguf_export as ge

    def boom(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(ge, "plan_tensors", boom)
    out = tmp_path / "o.gguf"
    r = run("convert", src, "-o", out, "-q")
    assert_error(r, "internal error: RuntimeError: simulated bug (rerun with --debug", out)
    r = run("--debug", "convert", src, "-o", out, "-q")
    assert r.exit_code == 2 and "Traceback" in r.stderr and "simulated bug" in r.stderr


def test_usage_errors_are_one_line(src):
    assert_error(run("convert", src), "Missing option")
    assert_error(run("nosuchcommand"), "No such command")
    assert_error(run("convert", src, "-o", "x.gguf", "--outtype", "q9"), "--outtype")


# -- verify compares what it claims to compare ------------------------------------------------


def test_hf_candidate_tokenizer_is_really_compared(gqa_model, tmp_path):
    cand = tmp_path / "cand"
    shutil.copytree(gqa_model, cand)
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()  # same pieces and ids, but without SentencePiece's dummy prefix
    proto.ParseFromString((cand / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    (cand / "tokenizer.model").write_bytes(proto.SerializeToString())
    r = run("verify", gqa_model, cand, "--ctx", "64", "--max-windows", "2", "-q")
    assert r.exit_code == 1 and "tokenization differs" in r.output, r.output
    r = run("verify", gqa_model, gqa_model, "--ctx", "64", "--max-windows", "2", "-q")
    assert r.exit_code == 0 and "identical" in r.output, r.output


# -- inspect ---------------------------------------------------------------------------------


def test_inspect_json_is_snake_case_with_numbers(gqa_model, good_gguf):
    for path in (good_gguf, gqa_model):
        r = run("inspect", path, "--json")
        assert r.exit_code == 0, r.stderr
        s = json.loads(r.output)
        assert all(k == k.lower() and " " not in k for k in s), list(s)
        assert isinstance(s["parameters"], int) and isinstance(s["size_mb"], float)
    s = json.loads(run("inspect", good_gguf, "--json").output)
    assert s["file_type"] == "q8_0" and s["tensor_types"]["Q8_0"] > 0


def test_merge_reports_self_merge_and_negative_weights(gqa_model, tmp_path):
    r = run("merge", gqa_model, gqa_model, "-o", tmp_path / "m", "--weights", "1.5,-0.5", "-q")
    assert r.exit_code == 0, r.stderr
    assert "merged with itself" in r.stderr and "negative weights [-0.5]" in r.stderr
