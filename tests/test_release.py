"""`mtool release build | plan | collect`: typed recipes, verified artifacts, manifest, checksums,
model card, provenance, incremental rebuilds and fan-out."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import yaml
from click.testing import CliRunner

from mtool.cli import cli
from mtool.errors import InputError
from mtool.recipes import builtin_names, load_recipe
from mtool.recipes.schema import parse_recipe
from mtool.release.manifest import comparable
from mtool.tiny import TinySpec, make_tiny_llama
from mtool.verify.report import Reference

from .telechat_reference import write_telechat

# trained longer than most fixtures: peaked predictions, so the 4-bit artifacts pass their default
# thresholds on merit and an impossible threshold is the only reason to fail
SPEC = TinySpec(tokenizer="spm", kv_heads=2, tied=False, train_steps=150, seed=21)

RECIPE = {
    "name": "my-model",
    "family": "llama",
    "eos_token": "</s>",
    "provenance": {"base_model": "org/my-model", "license": "apache-2.0", "languages": ["zh", "en"],
                   "quantized_by": "my-team"},
    "calibration": {"file": "calib.txt", "nsamples": 8, "seqlen": 64},
    "evaluation": {"ctx": 128, "max_windows": 4},
    "ollama": {"template": "{{ .System }}USER: {{ .Prompt }} ASSISTANT:", "stop": ["</s>"]},
    "artifacts": [
        {"name": "q8_0", "to": "gguf", "outtype": "q8_0"},
        {"name": "q4_k_m", "to": "gguf", "outtype": "q4_k_m", "imatrix": True, "verify": {"max_kld": 0.08}},
        {"name": "gptq-4bit", "to": "gptq", "bits": 4, "group_size": 128},
        {"name": "hf", "to": "hf"},
    ],
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("rel") / "src", SPEC)


def write_recipe(folder: Path, recipe: dict = RECIPE, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    from mtool.data import builtin_text

    (folder / "calib.txt").write_text(builtin_text(), encoding="utf-8")
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def build(src: Path, recipe: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["release", "build", str(src), "-r", str(recipe), "-o", str(out), "-q", *extra])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and ".mtool-release" not in p.parts and p.name not in ("manifest.json", "README.md",
                                                                                   "SHA256SUMS")}


@pytest.fixture(scope="module")
def release(src, tmp_path_factory):
    """One full release of the four artifacts, with the reference runs counted."""
    root = tmp_path_factory.mktemp("release")
    recipe = write_recipe(root)
    out = root / "out"
    runs = []
    original = Reference.iter_logits

    def counting(self, *a, **k):
        runs.append(1)
        return original(self, *a, **k)

    Reference.iter_logits = counting
    try:
        r = build(src, recipe, out)
    finally:
        Reference.iter_logits = original
    return {"root": root, "recipe": recipe, "out": out, "result": r, "reference_runs": len(runs)}


def test_release_builds_verifies_and_documents_everything(release):
    r, out = release["result"], release["out"]
    assert r.exit_code == 0, r.output + r.stderr
    m = manifest(out)
    assert [a["name"] for a in m["artifacts"]] == ["imatrix", "q8_0", "q4_k_m", "gptq-4bit", "hf"]
    assert all(a["status"] == "passed" for a in m["artifacts"][1:]), [a["verify"]["failures"] for a in m["artifacts"][1:]]
    assert m["complete"] and m["schema_version"] == 1
    # the reference model ran once for four verifications (counted, not self-reported)
    assert release["reference_runs"] == 1 and m["run"]["reference_runs"] == 1
    # every artifact compared on the same windows; the q4_k_m one with the recipe's threshold
    q4 = next(a for a in m["artifacts"] if a["name"] == "q4_k_m")
    assert q4["verify"]["thresholds"]["max_kld"] == 0.08 and q4["inputs"]["imatrix_sha256"] == m["artifacts"][0]["files"][0]["sha256"]
    assert q4["type_counts"].get("Q4_K") and 4.5 < q4["bits_per_weight"] < 9
    gptq = next(a for a in m["artifacts"] if a["name"] == "gptq-4bit")
    assert gptq["verify"]["artifact_type"] == "gptq-4bit" and gptq["type_counts"].get("I32")
    # source files with hashes, tools, resolved recipe
    assert {f["path"] for f in m["source"]["files"]} >= {"config.json", "model.safetensors", "tokenizer.model"}
    assert m["tools"]["mtool"] and m["tools"]["torch"] and m["tools"]["llama_cpp_python"]
    assert m["recipe"]["artifacts"][2]["group_size"] == 128 and m["recipe"]["artifacts"][2]["sym"] is True
    # the summary table names every artifact with its verdict
    for name in ("q8_0", "q4_k_m", "gptq-4bit", "hf"):
        assert name in r.output
    assert "reference model runs: 1" in r.output


def test_sha256sums_check_and_cover_every_published_file(release):
    out = release["out"]
    res = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    listed = {line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()}
    files = {f["path"] for a in manifest(out)["artifacts"] for f in a["files"]}
    assert listed == files and "my-model-hf/model.safetensors" in listed and "my-model-q8_0.Modelfile" in listed


def test_model_card_front_matter_and_usage(release):
    text = (release["out"] / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["base_model"] == "org/my-model" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0" and meta["language"] == ["zh", "en"] and meta["quantized_by"] == "my-team"
    assert {"gguf", "gptq", "safetensors"} <= set(meta["tags"]) and meta["library_name"]
    for snippet in ("llama-cli -m my-model-q8_0.gguf", "ollama create", "AutoModelForCausalLM",
                    "vllm serve", "</s>"):
        assert snippet in text
    m = manifest(release["out"])
    q8 = next(a for a in m["artifacts"] if a["name"] == "q8_0")
    assert f"{q8['verify']['metrics']['kld_mean']:.2e}" in text  # the measured figure, not a claim


def test_gguf_provenance_and_modelfile(release):
    out = release["out"]
    reader = gguf.GGUFReader(out / "my-model-q4_k_m.gguf")

    def val(key):
        f = reader.fields[key]
        return f.contents()

    assert val("general.base_model.count") == 1
    assert val("general.base_model.0.name") == "my-model"
    assert val("general.base_model.0.organization") == "org"
    assert val("general.base_model.0.repo_url") == "https://huggingface.co/org/my-model"
    assert val("general.quantized_by") == "my-team" and val("general.license") == "apache-2.0"
    assert val("general.languages") == ["zh", "en"]
    assert val("quantize.imatrix.file") == "my-model-imatrix.gguf"
    mf = (out / "my-model-q4_k_m.Modelfile").read_text().splitlines()
    assert mf[0] == "FROM ./my-model-q4_k_m.gguf"
    assert mf[1] == 'TEMPLATE """{{ .System }}USER: {{ .Prompt }} ASSISTANT:"""'
    assert 'PARAMETER stop "</s>"' in mf


def test_second_run_does_nothing_then_rebuilds_only_what_changed(src, release, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(release["out"], out)
    recipe = release["recipe"]
    before = mtimes(out)
    r = build(src, recipe, out)
    assert r.exit_code == 0, r.output + r.stderr
    assert "nothing to do" in r.output and "reference model runs: 0" in r.output
    assert mtimes(out) == before
    assert set(manifest(out)["run"]["actions"].values()) == {"reused"}

    # a deleted artifact is rebuilt, nothing else
    (out / "my-model-q8_0.gguf").unlink()
    r = build(src, recipe, out)
    assert r.exit_code == 0, r.output + r.stderr
    actions = manifest(out)["run"]["actions"]
    assert actions["q8_0"] == "built" and [k for k, v in actions.items() if v == "built"] == ["q8_0"]
    after = mtimes(out)
    assert {k for k in after if after[k] != before.get(k)} == {"my-model-q8_0.gguf", "my-model-q8_0.Modelfile"}

    # a corrupted one (same size, one byte changed) too
    st = out / "my-model-hf" / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[-5] ^= 0xFF
    st.write_bytes(bytes(data))
    r = build(src, recipe, out)
    assert r.exit_code == 0, r.output + r.stderr
    assert [k for k, v in manifest(out)["run"]["actions"].items() if v == "built"] == ["hf"]
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True).returncode == 0

    # one artifact's settings changed: only that one
    changed = json.loads(json.dumps(RECIPE))
    changed["artifacts"][2]["group_size"] = 64
    recipe2 = write_recipe(tmp_path / "r2", changed)
    r = build(src, recipe2, out)
    assert r.exit_code == 0, r.output + r.stderr
    assert [k for k, v in manifest(out)["run"]["actions"].items() if v == "built"] == ["gptq-4bit"]
    assert json.loads((out / "my-model-gptq-4bit" / "config.json").read_text())["quantization_config"]["group_size"] == 64


def test_impossible_threshold_fails_names_and_quarantines(src, release, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(release["out"], out)
    tight = json.loads(json.dumps(RECIPE))
    tight["artifacts"][0]["verify"] = {"max_kld": 1e-12}
    r = build(src, write_recipe(tmp_path / "tight", tight), out)
    assert r.exit_code == 1, r.output + r.stderr
    assert "q8_0" in r.stderr and "mean KLD" in r.output
    m = manifest(out)
    q8 = next(a for a in m["artifacts"] if a["name"] == "q8_0")
    assert q8["status"] == "failed" and q8["verify"]["thresholds"]["max_kld"] == 1e-12
    assert all(f["path"].startswith("failed/") for f in q8["files"])
    assert (out / "failed" / "my-model-q8_0.gguf").is_file() and not (out / "my-model-q8_0.gguf").exists()
    sums = (out / "SHA256SUMS").read_text()
    assert "q8_0" not in sums and "my-model-hf/model.safetensors" in sums
    assert "Not published: q8_0" in (out / "README.md").read_text()
    # thresholds are judged again without a rebuild: the original recipe publishes it again
    r = build(src, release["recipe"], out)
    assert r.exit_code == 0, r.output + r.stderr
    assert (out / "my-model-q8_0.gguf").is_file() and "built" not in manifest(out)["run"]["actions"].values()


def test_fan_out_parts_collect_to_the_same_manifest(src, release, tmp_path):
    recipe = release["recipe"]
    r = CliRunner().invoke(cli, ["release", "plan", str(src), "-r", str(recipe), "--parts", str(tmp_path / "parts")])
    assert r.exit_code == 0, r.output
    jobs = json.loads(r.output)["jobs"]
    assert [j["name"] for j in jobs] == ["imatrix", "q8_0", "q4_k_m", "gptq-4bit", "hf"]
    assert jobs[2]["needs"] == ["imatrix"] and "--imatrix" in jobs[2]["command"]
    matrix = json.loads(CliRunner().invoke(cli, ["release", "plan", str(src), "-r", str(recipe), "--format",
                                                 "github-matrix"]).output)
    assert [j["name"] for j in matrix["include"]] == ["q8_0", "q4_k_m", "gptq-4bit", "hf"]
    # every job at the same time, as separate processes; the q4_k_m job without the imatrix job's
    # file (it computes the same matrix itself)
    mtool = Path(sys.executable).parent / "mtool"  # the console script, as a CI job runs it
    procs = []
    for j in jobs:
        args = shlex.split(j["command"])
        if "--imatrix" in args:
            k = args.index("--imatrix")
            del args[k : k + 2]
        procs.append(subprocess.Popen([str(mtool), *args[1:], "-q"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        so, se = p.communicate(timeout=600)
        assert p.returncode == 0, so + se
    parts = [tmp_path / "parts" / j["name"] for j in jobs]
    assert manifest(parts[1])["complete"] is False and manifest(parts[1])["only"] == ["q8_0"]
    r = CliRunner().invoke(cli, ["release", "collect", *map(str, parts), "-o", str(tmp_path / "collected")])
    assert r.exit_code == 0, r.output + r.stderr
    collected = manifest(tmp_path / "collected")
    single = manifest(release["out"])
    # single-process builds of one source with one recipe, single or fanned out: the same release,
    # apart from the host and the timings
    assert comparable(collected) == comparable(single)
    assert (tmp_path / "collected" / "SHA256SUMS").read_text() == (release["out"] / "SHA256SUMS").read_text()
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp_path / "collected",
                          capture_output=True).returncode == 0


def test_collect_refuses_parts_of_other_sources_or_recipes(src, release, tmp_path):
    recipe = release["recipe"]
    ok = tmp_path / "p-q8"
    assert build(src, recipe, ok, "--only", "q8_0").exit_code == 0
    other_recipe = json.loads(json.dumps(RECIPE))
    other_recipe["description"] = "another recipe"
    p2 = tmp_path / "p-hf"
    assert build(src, write_recipe(tmp_path / "r2", other_recipe), p2, "--only", "hf").exit_code == 0
    r = CliRunner().invoke(cli, ["release", "collect", str(ok), str(p2), "-o", str(tmp_path / "c1")])
    assert r.exit_code == 2 and "recipe" in r.stderr and str(p2) in r.stderr
    src2 = tmp_path / "src2"
    shutil.copytree(src, src2)
    cfg = json.loads((src2 / "config.json").read_text())
    cfg["_note"] = "changed"
    (src2 / "config.json").write_text(json.dumps(cfg))
    p3 = tmp_path / "p-hf2"
    assert build(src2, recipe, p3, "--only", "hf").exit_code == 0
    r = CliRunner().invoke(cli, ["release", "collect", str(ok), str(p3), "-o", str(tmp_path / "c2")])
    assert r.exit_code == 2 and "source digest" in r.stderr
    r = CliRunner().invoke(cli, ["release", "collect", str(ok), "-o", str(tmp_path / "c3")])
    assert r.exit_code == 2 and "no part has artifact" in r.stderr


@pytest.mark.parametrize("change, message", [
    ({"colour": "blue"}, "unknown key 'colour'"),
    ({"calibration": {"nsamples": "many"}}, "calibration.nsamples must be an integer"),
    ({"artifacts": [{"name": "a", "to": "gguf", "outtype": "q8_0"}, {"name": "a", "to": "hf"}]},
     "artifact name 'a' is used twice"),
    ({"artifacts": [{"name": "x", "to": "gptq", "outtype": "q8_0"}]}, "unknown key 'outtype' for to: gptq"),
    ({"artifacts": [{"name": "x", "to": "gptq", "bits": 5}]}, "bits must be one of 2, 3, 4, 8"),
    ({"artifacts": [{"name": "iq", "to": "gguf", "outtype": "iq2_xxs"}]}, "needs an importance matrix"),
    # the tiny model's 128-wide rows do not fit K-quant super-blocks of 256, and fallbacks are forbidden
    ({"artifacts": [{"name": "k", "to": "gguf", "outtype": "q4_k_m", "no_fallback": True}]}, "artifact k (GGUF q4_k_m)"),
    ({"family": "mixtral"}, "is for mixtral models"),
])
def test_bad_recipes_one_line_exit_2_nothing_built(src, tmp_path, change, message):
    bad = {**json.loads(json.dumps(RECIPE)), **change}
    out = tmp_path / "out"
    r = build(src, write_recipe(tmp_path, bad), out)
    assert r.exit_code == 2, r.output + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not out.exists()


def test_unknown_only_name_is_refused(src, tmp_path):
    r = build(src, write_recipe(tmp_path), tmp_path / "out", "--only", "q9_9")
    assert r.exit_code == 2 and "has no artifact 'q9_9'" in r.stderr


def test_recipes_round_trip_and_builtins_parse():
    for n in builtin_names():
        rec = load_recipe(n)
        assert rec.artifacts, n
        assert parse_recipe(rec.as_dict(), n) == rec
    huozi = {a.name for a in load_recipe("huozi-3.5").artifacts}
    assert {"q4_0", "q2_k", "q4_k_m", "q5_k_m", "q8_0", "gptq-4bit", "awq-4bit"} <= huozi
    with pytest.raises(InputError, match="must be a list of strings"):
        parse_recipe({"name": "x", "family": "llama", "provenance": {"languages": [1]}}, "r")


def test_mixtral_and_telechat_releases(mixtral_model, tmp_path):
    moe = {"name": "huozi-tiny", "family": "mixtral", "eos_token": "<|endofutterance|>",
           "evaluation": {"ctx": 128, "max_windows": 4}, "calibration": {"nsamples": 8, "seqlen": 64},
           "artifacts": [{"name": "q8_0", "to": "gguf", "outtype": "q8_0"}, {"name": "hf", "to": "hf"},
                         {"name": "gptq-8bit", "to": "gptq", "bits": 8, "expert_naming": "gptqmodel"}]}
    r = build(mixtral_model, write_recipe(tmp_path / "moe", moe), tmp_path / "moe-out")
    assert r.exit_code == 0, r.output + r.stderr
    m = manifest(tmp_path / "moe-out")
    assert [a["status"] for a in m["artifacts"]] == ["passed"] * 3
    tc_src = write_telechat(tmp_path / "tc", "12b", seed=11)
    tc = {"name": "telechat-tiny", "family": "telechat", "eos_token": "<_end>", "evaluation": {"ctx": 128},
          "artifacts": [{"name": "f16", "to": "gguf", "outtype": "f16"}, {"name": "hf", "to": "hf"}]}
    r = build(tc_src, write_recipe(tmp_path / "tcr", tc), tmp_path / "tc-out")
    assert r.exit_code == 0, r.output + r.stderr
    m = manifest(tmp_path / "tc-out")
    assert [a["status"] for a in m["artifacts"]] == ["passed", "passed"]
    # TeleChat's normalized checkpoint is a plain Llama
    cfg = json.loads((tmp_path / "tc-out" / "telechat-tiny-hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_github_actions_example_uses_the_plan_it_gets(src, release):
    """The shipped workflow reads the keys `plan --format github-matrix` prints and runs collect."""
    wf = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples/github-actions/release.yml").read_text())
    jobs = wf["jobs"]
    assert list(jobs) == ["plan", "imatrix", "build", "collect"]
    assert jobs["build"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    steps = " ".join(str(s) for s in jobs["build"]["steps"])
    r = CliRunner().invoke(cli, ["release", "plan", str(src), "-r", str(release["recipe"]), "--format", "github-matrix"])
    entry = json.loads(r.output)["include"][0]
    for key in ("command", "needs_imatrix", "name"):
        assert key in entry and f"matrix.{key}" in steps
    assert "--only imatrix" in " ".join(str(s.get("run", "")) for s in jobs["imatrix"]["steps"])
    assert "mtool release collect parts/*" in " ".join(str(s.get("run", "")) for s in jobs["collect"]["steps"])
    shell = CliRunner().invoke(cli, ["release", "plan", str(src), "-r", str(release["recipe"]), "--format", "shell"])
    assert shell.output.splitlines()[0].endswith("--only imatrix")


def test_interrupted_release_resumes_where_it_stopped(src, release, tmp_path, monkeypatch):
    """Ctrl-C while the third artifact builds: exit 130, the first two are in the manifest; the next run
    builds the rest only (and the reference, whose cache was complete, does not run again)."""
    import mtool.release.build as rb

    out = tmp_path / "out"
    real = rb.build_artifact

    def interrupt_at_gptq(model, spec, target, inputs):
        if spec.name == "gptq-4bit":
            raise KeyboardInterrupt
        return real(model, spec, target, inputs)

    monkeypatch.setattr(rb, "build_artifact", interrupt_at_gptq)
    r = build(src, release["recipe"], out)
    assert r.exit_code == 130, r.output + r.stderr
    m = manifest(out)
    assert [a["name"] for a in m["artifacts"]] == ["imatrix", "q8_0", "q4_k_m"] and not m["complete"]
    assert not (out / "SHA256SUMS").exists()
    monkeypatch.setattr(rb, "build_artifact", real)
    js = tmp_path / "run.json"
    r = build(src, release["recipe"], out, "--json", str(js))
    assert r.exit_code == 0, r.output + r.stderr
    actions = manifest(out)["run"]["actions"]
    assert actions == {"imatrix": "reused", "q8_0": "reused", "q4_k_m": "reused", "gptq-4bit": "built", "hf": "built"}
    assert manifest(out)["run"]["reference_runs"] == 0 and json.loads(js.read_text())["complete"]
    assert comparable(manifest(out)) == comparable(manifest(release["out"]))


def test_refuses_a_folder_that_is_not_a_release(src, release, tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = build(src, release["recipe"], out)
    assert r.exit_code == 2 and "no release in it" in r.stderr and sorted(os.listdir(out)) == ["notes.txt"]


def test_release_input_errors_one_line_exit_2(src, release, tmp_path):
    """The refusals of release build and collect: one `error:` line naming the file or option, exit 2,
    nothing written."""
    def one_line(r, needle):
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr

    no_calib = {**json.loads(json.dumps(RECIPE)), "calibration": {"file": "missing.txt"}}
    out = tmp_path / "o1"
    one_line(build(src, write_recipe(tmp_path / "a", no_calib), out), "calibration.file")
    one_line(build(src, release["recipe"], out, "--imatrix", str(tmp_path / "none.gguf")), "--imatrix")
    empty = {"name": "e", "family": "llama"}
    one_line(build(src, write_recipe(tmp_path / "b", empty), out), "lists no artifacts")
    assert not out.exists()
    inside = src / "release"
    one_line(build(src, release["recipe"], inside), "inside the source")
    assert not inside.exists()
    # collect: a part whose file no longer matches its manifest, and a non-empty destination
    part = tmp_path / "part"
    shutil.copytree(release["out"], part)
    (part / "my-model-q8_0.Modelfile").write_text("FROM elsewhere\n")
    dest = tmp_path / "dest"
    r = CliRunner().invoke(cli, ["release", "collect", str(part), "-o", str(dest)])
    one_line(r, "do not match their sha256")
    assert not dest.exists()
    dest.mkdir()
    (dest / "x").write_text("x")
    r = CliRunner().invoke(cli, ["release", "collect", str(release["out"]), "-o", str(dest)])
    one_line(r, "not empty")
    assert sorted(os.listdir(dest)) == ["x"]


def test_collect_hashes_each_linked_file_once_and_notices_a_change(release, tmp_path, monkeypatch):
    """Parts on the same file system are hard-linked: each file is hashed once (checking the part),
    not again after linking; a file that changes after its check is hashed again and refused."""
    from mtool.release import fanout

    hashed: list[str] = []
    real = fanout.sha256_file

    def counting(p):
        hashed.append(Path(p).name)
        return real(p)

    monkeypatch.setattr(fanout, "sha256_file", counting)
    monkeypatch.setattr("mtool.release.build.sha256_file", counting)
    part = tmp_path / "part"
    shutil.copytree(release["out"], part)
    r = CliRunner().invoke(cli, ["release", "collect", str(part), "-o", str(tmp_path / "c1")])
    assert r.exit_code == 0, r.output + r.stderr
    files = [f["path"] for a in manifest(part)["artifacts"] for f in a["files"]]
    assert sorted(hashed) == sorted(Path(f).name for f in files)  # once each
    assert os.stat(tmp_path / "c1" / files[0]).st_ino == os.stat(part / files[0]).st_ino  # linked

    # a file rewritten (same bytes length, other content) between its check and its placing
    victim = next(f for f in files if f.endswith(".gguf"))
    check = fanout.intact

    def tamper(path, entry):
        ok = check(path, entry)
        if any(f["path"] == victim for f in entry["files"]):
            data = bytearray((path / victim).read_bytes())
            data[-1] ^= 0xFF
            (path / victim).write_bytes(bytes(data))
            os.utime(path / victim, ns=(1, 1))  # a different mtime whatever the clock's resolution
        return ok

    monkeypatch.setattr(fanout, "intact", tamper)
    r = CliRunner().invoke(cli, ["release", "collect", str(part), "-o", str(tmp_path / "c2")])
    assert r.exit_code == 2 and "changed while it was collected" in r.stderr, r.stderr
