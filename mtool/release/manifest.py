"""The release manifest (DIR/manifest.json) and DIR/SHA256SUMS.

Schema (version 1; keys are only ever added within a version):

    schema: "mtool-release-manifest"      schema_version: 1
    complete: bool                        true for a whole release, false for a part (--only)
    only: [name, ...]                     the artifacts a part was asked for (parts only)
    recipe: {...}                         the recipe as resolved (defaults filled in)
    recipe_digest: sha256                 of `recipe`
    source: {path, files: [{path, size, sha256}], config_sha256, digest}
    calibration: {file, file_sha256, nsamples, seqlen}
    evaluation: {data, data_sha256, ctx, max_windows, windows, positions, key}
    tools: {mtool, python, torch, transformers, gguf, llama_cpp_python, safetensors, tokenizers, numpy, libggml}
    artifacts: [{name, to, label, settings, status: passed | failed | built, build_key,
                 files: [{path, size, sha256}], size, n_params, bits_per_weight, type_counts,
                 fallbacks: [..], inputs: {imatrix_sha256}, build_seconds,
                 verify: {metrics, thresholds, failures, tokenization, reference, candidate, seconds}}]
    run: {host, started, seconds, reference_runs, built: [...], reused: [...]}   (this run only)

Paths are relative to DIR. A failed artifact's files lie under DIR/failed/ and are not in SHA256SUMS.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..ggml import ggml
from ..outputs import write_report

SCHEMA = "mtool-release-manifest"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
# fields that differ between two runs of the same release (where and how long), not in what was built
RUN_FIELDS = ("run",)
ARTIFACT_RUN_FIELDS = ("build_seconds",)


def tool_versions() -> dict:
    """Versions of mtool and of every library that shapes an artifact's bytes or figures."""
    out = {"mtool": __version__, "python": platform.python_version()}
    for dist, key in (("torch", "torch"), ("transformers", "transformers"), ("gguf", "gguf"),
                      ("llama_cpp_python", "llama_cpp_python"), ("safetensors", "safetensors"),
                      ("tokenizers", "tokenizers"), ("numpy", "numpy")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    try:
        out["libggml"] = Path(ggml().path).name
    except Exception:  # noqa: BLE001 - a missing libggml is reported where it is needed, not here
        out["libggml"] = None
    return out


def host_info() -> dict:
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "python": sys.version.split()[0]}


def read_manifest(folder: Path, *, required: bool = False) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        if required:
            raise InputError(f"{folder} has no {MANIFEST}: not a release or release part")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        if required:
            raise InputError(f"{path} cannot be read: {e}") from None
        return None  # a broken manifest of an earlier run: rebuilt from scratch
    if data.get("schema") != SCHEMA:
        raise InputError(f"{path} is not an mtool release manifest")
    if data.get("schema_version", 0) > SCHEMA_VERSION:
        raise InputError(f"{path} has schema version {data['schema_version']}; this mtool reads up to "
                         f"{SCHEMA_VERSION} (upgrade mtool)")
    return data


def write_manifest(folder: Path, manifest: dict) -> Path:
    return write_report(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False)
                        + "\n")


def published_files(manifest: dict) -> list[dict]:
    """The files of the artifacts that passed (or were built without verification)."""
    return [f for a in manifest["artifacts"] if a["status"] != "failed" for f in a["files"]]


def write_sums(folder: Path, manifest: dict) -> Path:
    """SHA256SUMS in the format `sha256sum -c` reads (two spaces, then the relative path)."""
    lines = [f"{f['sha256']}  {f['path']}\n" for f in published_files(manifest)]
    return write_report(Path(folder) / SUMS, "".join(lines))


def comparable(manifest: dict) -> dict:
    """The manifest without what differs between runs of the same release (host, timings)."""
    out = {k: v for k, v in manifest.items() if k not in RUN_FIELDS and k not in ("complete", "only")}
    out["artifacts"] = [{k: v for k, v in a.items() if k not in ARTIFACT_RUN_FIELDS}
                        | ({"verify": {k: v for k, v in a["verify"].items() if k != "seconds"}} if a.get("verify") else {})
                        for a in manifest["artifacts"]]
    return out
