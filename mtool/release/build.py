"""`mtool release build`: every artifact of a recipe built, verified against the source, checksummed
and documented, incrementally.

Each artifact has a build key: the digest of what its bytes depend on (source files, its settings,
the recipe's template/eos/provenance, calibration text, the importance matrix, mtool's version). A
rerun keeps an artifact whose key is unchanged and whose files still hash as recorded, and rebuilds
the others; the manifest is rewritten after every artifact, so an interrupted release resumes where
it stopped. The reference model runs at most once per run: its logits over the verify windows are
cached on disk (verify/refcache.py) and every artifact is compared with them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ..artifacts import BuildInputs, artifact_path, build_artifact, check_artifact, output_files
from ..convert.imatrix_file import read_imatrix
from ..device import resolve_device
from ..errors import InputError, OutputError
from ..model.families import load_canonical
from ..outputs import output_lock, write_report
from ..quantize.imatrix import make_imatrix
from ..recipes.schema import IMATRIX_ARTIFACT, ArtifactSpec, Recipe
from ..verify.refcache import CachedReference
from ..verify.report import compare_candidate, open_reference, verdict
from .card import human_size, model_card, modelfile
from .fingerprint import digest, fingerprint_source, sha256_file
from .manifest import SCHEMA, SCHEMA_VERSION, host_info, read_manifest, tool_versions, write_manifest, write_sums

STATE_DIR = ".mtool-release"  # source hashes and cached reference logits; not published
FAILED_DIR = "failed"  # artifacts that failed verification: kept for inspection, not published


@dataclass
class ReleaseOptions:
    only: tuple[str, ...] = ()  # build these artifacts only (a part, for fan-out); "imatrix" names the matrix
    force: bool = False  # rebuild everything
    device: str = "auto"
    imatrix: Path | None = None  # use this importance matrix (e.g. from the imatrix job) instead of computing
    threads: int | None = None  # llama.cpp threads when verifying GGUFs
    progress: bool = True


@dataclass
class ReleaseResult:
    out: Path
    manifest: dict
    actions: dict[str, str] = field(default_factory=dict)  # artifact -> built | reused | verified | re-judged
    reference_runs: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list[str]:
        return [a["name"] for a in self.manifest["artifacts"] if a["status"] == "failed"]

    @property
    def passed(self) -> bool:
        return not self.failed

    def table(self) -> str:
        """One line per artifact: size, bits per weight, the verification figures, verdict, time."""
        head = ("artifact", "size", "bpw", "PPL ratio", "mean KLD", "top-1", "verdict", "time", "this run")
        rows = [head]
        for a in self.manifest["artifacts"]:
            m = (a.get("verify") or {}).get("metrics") or {}
            secs = (a.get("build_seconds") or 0) + ((a.get("verify") or {}).get("seconds") or 0)
            rows.append((a["name"], human_size(a["size"]), f"{a['bits_per_weight']:.2f}" if a["bits_per_weight"] else "-",
                         f"{m['ppl_ratio']:.4f}" if m.get("ppl_ratio") is not None else "-",
                         f"{m['kld_mean']:.2e}" if m.get("kld_mean") is not None else "-",
                         f"{100 * m['top1_agreement']:.1f} %" if m.get("top1_agreement") is not None else "-",
                         a["status"].upper(), f"{secs:.1f} s", self.actions.get(a["name"], "-")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return "\n".join(lines)


def _file_entry(out: Path, path: Path) -> dict:
    return {"path": path.relative_to(out).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}


def intact(out: Path, entry: dict) -> bool:
    """Every file of a manifest entry is there with the recorded size and sha256."""
    for f in entry.get("files", []):
        p = out / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
            return False
    return bool(entry.get("files"))


def _move(out: Path, entry: dict, to_failed: bool) -> None:
    """Move an artifact's files into DIR/failed/ (or back), keeping the entry's paths right."""
    tops = {PurePosixPath(f["path"]).parts[1 if f["path"].startswith(FAILED_DIR + "/") else 0] for f in entry["files"]}
    src_base, dst_base = (out, out / FAILED_DIR) if to_failed else (out / FAILED_DIR, out)
    dst_base.mkdir(exist_ok=True)
    for top in sorted(tops):
        if (dst_base / top).exists():
            shutil.rmtree(dst_base / top) if (dst_base / top).is_dir() else (dst_base / top).unlink()
        os.replace(src_base / top, dst_base / top)
    for f in entry["files"]:
        rel = f["path"].removeprefix(FAILED_DIR + "/")
        f["path"] = f"{FAILED_DIR}/{rel}" if to_failed else rel


class _Release:
    """One run of `release build` over one output folder."""

    def __init__(self, src: Path, recipe: Recipe, out: Path, opts: ReleaseOptions, echo: Callable[[str], None]):
        self.src, self.recipe, self.out, self.opts, self.echo = Path(src), recipe, Path(out), opts, echo
        self.state = self.out / STATE_DIR
        self.result = ReleaseResult(self.out, {})
        self.cache: CachedReference | None = None
        self.entries: dict[str, dict] = {}
        self.step = 0

    # -- the steps ---------------------------------------------------------------------------------

    def select(self) -> tuple[list[ArtifactSpec], bool]:
        r = self.recipe
        if not r.artifacts:
            raise InputError(f"recipe {r.name} lists no artifacts")
        names = list(dict.fromkeys(self.opts.only))
        specs = [r.artifact(n) for n in names if n != IMATRIX_ARTIFACT] if names else list(r.artifacts)
        want_im = IMATRIX_ARTIFACT in names or any(a.needs_imatrix for a in specs)
        if IMATRIX_ARTIFACT in names and not r.needs_imatrix:
            raise InputError(f"recipe {r.name} has no artifact that uses an importance matrix")
        return specs, want_im

    def say(self, text: str) -> None:
        self.step += 1
        self.echo(f"[{self.step}] {text}")

    def run(self) -> ReleaseResult:
        t0 = time.perf_counter()
        r, o = self.recipe, self.opts
        specs, want_im = self.select()
        self.say(f"checking {self.src} against recipe {r.name}")
        model = load_canonical(self.src)
        r.check_family(model.family)
        for a in specs:  # every refusal before anything is built
            check_artifact(model, a)
        calib = r.path(r.calibration.file)
        data = r.path(r.evaluation.data)
        for what, p in (("calibration.file", calib), ("evaluation.data", data)):
            if p is not None and not p.is_file():
                raise InputError(f"recipe {r.name}: {what} {p} not found")
        if o.imatrix is not None and not Path(o.imatrix).is_file():
            raise InputError(f"--imatrix {o.imatrix} not found")
        if self.out.resolve() == self.src.resolve() or self.src.resolve() in self.out.resolve().parents:
            raise OutputError(f"output {self.out} lies inside the source {self.src}; choose another folder")
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"output {self.out} exists and is not a folder")
        if (self.out.is_dir() and any(self.out.iterdir()) and not (self.out / "manifest.json").exists()
                and not self.state.exists() and not o.force):
            raise OutputError(f"output {self.out} is a folder with other files and no release in it; "
                              f"choose an empty or new folder, or pass --force to build into it")
        self.out.mkdir(parents=True, exist_ok=True)
        with output_lock(self.out):
            return self._run_locked(model, specs, want_im, calib, data, t0)

    def _run_locked(self, model, specs, want_im, calib, data, t0) -> ReleaseResult:
        r, o = self.recipe, self.opts
        self.state.mkdir(exist_ok=True)
        old = read_manifest(self.out) or {}
        old_entries = {a["name"]: a for a in old.get("artifacts", [])}
        known_path = self.state / "source-hashes.json"
        known = json.loads(known_path.read_text()) if known_path.is_file() else {}
        self.say(f"hashing {self.src}")
        source, known = fingerprint_source(self.src, known, progress=o.progress)
        write_report(known_path, json.dumps(known))
        tools = tool_versions()
        device = resolve_device(o.device)
        base = {"source": source["digest"], "mtool": tools["mtool"]}
        cal = {"file": r.calibration.file, "file_sha256": sha256_file(calib) if calib else None,
               "nsamples": r.calibration.nsamples, "seqlen": r.calibration.seqlen}
        ev = {"data": r.evaluation.data, "data_sha256": sha256_file(data) if data else None,
              "ctx": r.evaluation.ctx, "max_windows": r.evaluation.max_windows}
        eval_key = digest({**base, **ev})
        resolved = r.as_dict()
        common = {**base, "recipe": {k: v for k, v in resolved.items()
                                     if k in ("name", "chat_template", "eos_token", "provenance", "ollama")}}
        self.manifest = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": False,
            **({"only": list(o.only)} if o.only else {}),
            "recipe": resolved, "recipe_digest": digest(resolved), "source": source,
            "calibration": cal, "evaluation": {**ev, "key": eval_key}, "tools": tools, "artifacts": [],
            "run": {"host": host_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device},
        }
        im, im_sha = None, None
        if want_im:
            im, im_sha = self._imatrix(model, old_entries.get(IMATRIX_ARTIFACT), base, cal, calib, device)
        self.reference = open_reference(self.src, data=data, device=device, ctx=r.evaluation.ctx,
                                        max_windows=r.evaluation.max_windows, model=model)
        self.cache = CachedReference(self.reference, self.state / f"reference-{eval_key[:16]}.npy")
        self.manifest["evaluation"].update(windows=len(self.reference.windows),
                                           positions=sum(len(w) for w in self.reference.windows))
        for a in specs:
            key = digest({**common, "artifact": a.settings(), "calibration": cal if a.calibrated else None,
                          "imatrix": im_sha if a.needs_imatrix else None})
            self._artifact(model, a, key, eval_key, old_entries.get(a.name), calib, device,
                           im if a.needs_imatrix else None, im_sha if a.needs_imatrix else None)
        self.manifest["complete"] = not o.only
        self._save()
        if self.manifest["complete"]:
            write_sums(self.out, self.manifest)
            write_report(self.out / "README.md", model_card(self.manifest, r))
        self.result.manifest = self.manifest
        self.result.reference_runs = self.cache.runs
        self.result.seconds = time.perf_counter() - t0
        self.manifest["run"].update(seconds=round(self.result.seconds, 3), reference_runs=self.cache.runs,
                                    actions=self.result.actions)
        write_manifest(self.out, self.manifest)
        return self.result

    def _save(self) -> None:
        order = [IMATRIX_ARTIFACT] + [a.name for a in self.recipe.artifacts]
        self.manifest["artifacts"] = [self.entries[n] for n in order if n in self.entries]
        write_manifest(self.out, self.manifest)

    def _imatrix(self, model, old: dict | None, base: dict, cal: dict, calib: Path | None, device: str):
        """The importance matrix: given (--imatrix), kept from an earlier run, or computed (an artifact too)."""
        if self.opts.imatrix is not None:
            path = Path(self.opts.imatrix)
            self.say(f"importance matrix: using {path}")
            im = read_imatrix(path)
            im.path = Path(path.name)
            return im, sha256_file(path)
        key = digest({**base, "calibration": cal, "to": IMATRIX_ARTIFACT})
        path = self.out / f"{self.recipe.name}-{IMATRIX_ARTIFACT}.gguf"
        if not self.opts.force and old and old.get("build_key") == key and intact(self.out, old):
            self.say("importance matrix: unchanged")
            entry, action = old, "reused"
        else:
            self.say(f"importance matrix on {cal['nsamples']} x {cal['seqlen']} calibration tokens ({device})")
            rep = make_imatrix(model, path, calib=calib, nsamples=cal["nsamples"], seqlen=cal["seqlen"],
                               device=device, force=True, dataset=calib.name if calib else "built-in")
            entry = {"name": IMATRIX_ARTIFACT, "to": IMATRIX_ARTIFACT, "label": "importance matrix (llama.cpp GGUF)",
                     "settings": {"to": IMATRIX_ARTIFACT, "nsamples": cal["nsamples"], "seqlen": cal["seqlen"]},
                     "status": "built", "build_key": key, "files": [_file_entry(self.out, path)],
                     "size": path.stat().st_size, "n_params": 0, "bits_per_weight": 0, "type_counts": {},
                     "fallbacks": [], "inputs": {}, "build_seconds": round(rep.seconds, 3), "verify": None}
            action = "built"
        self.entries[IMATRIX_ARTIFACT] = entry
        self.result.actions[IMATRIX_ARTIFACT] = action
        self._save()
        im = read_imatrix(path)
        im.path = Path(path.name)
        return im, entry["files"][0]["sha256"]

    def _artifact(self, model, a: ArtifactSpec, key: str, eval_key: str, old: dict | None, calib: Path | None,
                  device: str, im, im_sha: str | None) -> None:
        r, o = self.recipe, self.opts
        if not o.force and old and old.get("build_key") == key and intact(self.out, old):
            entry = old
            if (old.get("verify") or {}).get("key") == eval_key:
                self._judge(a, entry)
                self.say(f"{a.name}: unchanged ({entry['status']})")
                self.result.actions[a.name] = "reused"
            else:
                self.say(f"{a.name}: unchanged; verifying")
                if entry["status"] == "failed":
                    _move(self.out, entry, to_failed=False)
                self._verify(a, entry, eval_key)
                self.result.actions[a.name] = "verified"
        else:
            why = "forced" if o.force and old else "changed" if old and old.get("build_key") != key else \
                "missing or corrupted" if old else "new"
            self.say(f"{a.name}: building {a.label()} ({why})")
            target = artifact_path(self.out, r.name, a)
            bar = None
            if a.calibrated and o.progress:
                bar = tqdm(total=model.n_layers, desc="layers", unit="layer", leave=False)
            built = build_artifact(model, a, target, BuildInputs(
                recipe=r, calib=calib, nsamples=r.calibration.nsamples, seqlen=r.calibration.seqlen, device=device,
                imatrix=im, gguf_name=r.name, force=True, progress=o.progress,
                on_layer=(lambda rep: bar.update(1)) if bar else None))
            if bar:
                bar.close()
            files = output_files(target, a)
            if a.to == "gguf" and r.ollama is not None:
                mf = target.with_suffix(".Modelfile")
                write_report(mf, modelfile(r, files[0].name))
                files.append(mf)
            for note in built.notes:
                self.echo(f"note: {a.name}: {note}")
            stale = self.out / FAILED_DIR
            for f in (old or {}).get("files", []):  # a failed copy of the earlier build goes now
                if f["path"].startswith(FAILED_DIR + "/"):
                    top = stale / PurePosixPath(f["path"]).parts[1]
                    shutil.rmtree(top, ignore_errors=True) if top.is_dir() else top.unlink(missing_ok=True)
            entries = [_file_entry(self.out, f) for f in files]
            entry = {"name": a.name, "to": a.to, "label": a.label(), "settings": a.settings(), "status": "built",
                     "build_key": key, "files": entries, "size": sum(f["size"] for f in entries),
                     "n_params": built.n_params, "bits_per_weight": round(built.bits_per_weight, 4),
                     "type_counts": dict(sorted(built.type_counts.items())), "fallbacks": built.fallbacks,
                     "inputs": {"imatrix_sha256": im_sha} if im_sha else {},
                     "build_seconds": round(built.seconds, 3), "verify": None}
            self.result.actions[a.name] = "built"
            self._verify(a, entry, eval_key)
        self.entries[a.name] = entry
        self._save()

    def _verify(self, a: ArtifactSpec, entry: dict, eval_key: str) -> None:
        """Compare the artifact with the cached reference logits and record the verdict."""
        first = self.out / entry["files"][0]["path"]
        cand = first if a.to == "gguf" else first.parent
        t0 = time.perf_counter()
        if not self.cache.ready:
            self.say("running the reference model once for every artifact's verification")
        rep = compare_candidate(self.reference, self.cache.iter_logits, cand, overrides=a.verify.overrides(),
                                threads=self.opts.threads, progress=self.opts.progress)
        d = rep.as_dict()
        entry["verify"] = {"key": eval_key, "artifact_type": d["artifact_type"], "metrics": d["metrics"],
                           "thresholds": d["thresholds"], "failures": d["failures"],
                           "tokenization": d["tokenization"].get("summary"),
                           "reference": rep.ref_runner, "candidate": rep.cand_runner,
                           "tokenization_failed": bool(d["tokenization"].get("checked"))
                           and not d["tokenization"].get("match"),
                           "seconds": round(time.perf_counter() - t0, 3)}
        self._judge(a, entry)

    def _judge(self, a: ArtifactSpec, entry: dict) -> None:
        """The verdict against the recipe's current thresholds (changed thresholds need no new run)."""
        v = entry["verify"]
        v["thresholds"], v["failures"] = verdict(v["metrics"], v["artifact_type"],
                                                 {"checked": True, "match": not v["tokenization_failed"]},
                                                 overrides=a.verify.overrides())
        failures = v["failures"]
        status = "failed" if failures else "passed"
        was_failed = entry["status"] == "failed"
        if status == "failed" and not was_failed:
            _move(self.out, entry, to_failed=True)
        elif status == "passed" and was_failed:
            _move(self.out, entry, to_failed=False)
        entry["status"] = status
        if failures:
            self.echo(f"FAIL {a.name}: {'; '.join(failures)} (kept out of the release, in {FAILED_DIR}/)")


def release_build(src: Path, recipe: Recipe, out: Path, opts: ReleaseOptions | None = None,
                  echo: Callable[[str], None] = print) -> ReleaseResult:
    """Build, verify, checksum and document the artifacts of `recipe` from the checkpoint `src` into `out`."""
    return _Release(src, recipe, out, opts or ReleaseOptions(), echo).run()
