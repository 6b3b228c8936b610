"""Fan-out over any scheduler: `release plan` lists one job per artifact, each job is a
`release build --only NAME` into its own folder (a part), and `release collect` checks that the
parts agree and assembles the release. mtool schedules nothing itself: GitHub Actions, a Slurm
array or Kubernetes jobs run the commands `plan` prints."""

from __future__ import annotations

import os
import shlex
import shutil
import time
from pathlib import Path

from ..errors import InputError, OutputError
from ..outputs import output_lock, write_report
from ..recipes.schema import IMATRIX_ARTIFACT, Recipe, parse_recipe
from .build import intact
from .card import model_card
from .fingerprint import sha256_file
from .manifest import host_info, read_manifest, write_manifest, write_sums


def plan(src: str, recipe_arg: str, recipe: Recipe, parts: str = "parts", extra: tuple[str, ...] = ()) -> list[dict]:
    """One job per artifact (and one for the importance matrix when an artifact needs it), each
    with the command that builds it into PARTS/NAME and the jobs it needs first."""
    def command(name: str, needs_im: bool) -> str:
        args = ["mtool", "release", "build", src, "-r", recipe_arg, "-o", f"{parts}/{name}", "--only", name, *extra]
        if needs_im:
            args += ["--imatrix", f"{parts}/{IMATRIX_ARTIFACT}/{recipe.name}-{IMATRIX_ARTIFACT}.gguf"]
        return shlex.join(args)

    jobs = []
    if recipe.needs_imatrix:
        jobs.append({"name": IMATRIX_ARTIFACT, "to": IMATRIX_ARTIFACT, "needs": [], "output": f"{parts}/{IMATRIX_ARTIFACT}",
                     "command": command(IMATRIX_ARTIFACT, False)})
    for a in recipe.artifacts:
        needs = [IMATRIX_ARTIFACT] if a.needs_imatrix else []
        jobs.append({"name": a.name, "to": a.to, "needs": needs, "output": f"{parts}/{a.name}",
                     "command": command(a.name, bool(needs))})
    return jobs


def github_matrix(jobs: list[dict]) -> dict:
    """The artifact jobs as a GitHub Actions matrix (`strategy.matrix: ${{ fromJSON(...) }}`); the
    importance matrix job, when there is one, runs before the matrix (examples/github-actions)."""
    return {"include": [{"name": j["name"], "to": j["to"], "needs_imatrix": bool(j["needs"]), "command": j["command"]}
                        for j in jobs if j["name"] != IMATRIX_ARTIFACT]}


_AGREE = (("source digest", lambda m: m["source"]["digest"]), ("recipe", lambda m: m["recipe_digest"]),
          ("mtool version", lambda m: m["tools"]["mtool"]), ("verify windows", lambda m: m["evaluation"]["key"]),
          ("manifest schema", lambda m: m["schema_version"]))


def collect(parts: list[Path], out: Path, *, force: bool = False) -> tuple[dict, Recipe]:
    """Check that the parts agree, copy their artifacts into `out` (checking every hash) and write
    the release's manifest, SHA256SUMS and model card."""
    t0 = time.perf_counter()
    if not parts:
        raise InputError("give the part folders to collect")
    manifests = [(Path(p), read_manifest(Path(p), required=True)) for p in parts]
    first_path, first = manifests[0]
    for path, m in manifests[1:]:
        for what, get in _AGREE:
            if get(m) != get(first):
                raise InputError(f"part {path} was made from another {what} than part {first_path}; "
                                 f"parts of one release must share source, recipe and mtool version")
    entries: dict[str, tuple[Path, dict]] = {}
    checked: dict[str, tuple] = {}  # part file -> its (inode, size, mtime) when its hash was checked
    for path, m in manifests:
        for a in m["artifacts"]:
            if a["name"] in entries:
                if [f["sha256"] for f in entries[a["name"]][1]["files"]] != [f["sha256"] for f in a["files"]]:
                    raise InputError(f"artifact {a['name']} is in parts {entries[a['name']][0]} and {path} "
                                     f"with different bytes")
                continue
            stamps = {f["path"]: _stamp(path / f["path"]) for f in a["files"]}  # taken before hashing
            if not intact(path, a):
                raise InputError(f"part {path}: the files of artifact {a['name']} are missing or do not match "
                                 f"their sha256 in its manifest")
            checked.update({str(path / k): v for k, v in stamps.items()})
            entries[a["name"]] = (path, a)
    recipe = parse_recipe(first["recipe"], f"the recipe in {first_path / 'manifest.json'}")
    names = [a.name for a in recipe.artifacts]
    missing = [n for n in names if n not in entries]
    if missing:
        raise InputError(f"no part has artifact(s) {', '.join(missing)}; run their jobs first")
    im = entries.get(IMATRIX_ARTIFACT)
    for n in names:
        want = (entries[n][1].get("inputs") or {}).get("imatrix_sha256")
        if want and (im is None or im[1]["files"][0]["sha256"] != want):
            raise InputError(f"artifact {n} was quantized with an importance matrix that no part provides "
                             f"(sha256 {want[:16]}...); collect the imatrix part too")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputError(f"output {out} exists and is not empty; pass --force to collect into it")
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        order = ([IMATRIX_ARTIFACT] if im else []) + names
        arts = []
        for n in order:
            path, a = entries[n]
            for f in a["files"]:
                _place(path / f["path"], out / f["path"], f["sha256"], checked.get(str(path / f["path"])))
            arts.append(a)
        manifest = {k: v for k, v in first.items() if k not in ("only", "run", "artifacts")}
        manifest.update(complete=True, artifacts=arts,
                        run={"host": host_info(), "collected_from": [str(p) for p, _ in manifests],
                             "seconds": round(time.perf_counter() - t0, 3)})
        write_manifest(out, manifest)
        write_sums(out, manifest)
        write_report(out / "README.md", model_card(manifest, recipe))
    return manifest, recipe


def _stamp(p: Path) -> tuple | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _place(src: Path, dst: Path, sha256: str, checked: tuple | None = None) -> None:
    """Hard-link (same file system) or copy `src` to `dst` atomically, checking its hash.

    A hard link whose inode, size and mtime are those of the file when its hash was checked is
    not hashed again (it is that file); a copy, or a file touched since, is."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_file() and sha256_file(dst) == sha256:
        return
    tmp = dst.with_name(f".{dst.name}.mtool-tmp.{os.getpid()}")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    if (checked is None or _stamp(tmp) != checked) and sha256_file(tmp) != sha256:
        tmp.unlink()
        raise InputError(f"{src} changed while it was collected (sha256 differs from its part's manifest)")
    os.replace(tmp, dst)
