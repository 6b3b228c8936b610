"""Hashes: of files (sha256, streamed), of a source checkpoint, and of plain data (build keys)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

_BUF = 16 * 2**20
# what a checkpoint folder may hold that is not the checkpoint (VCS and hub caches)
_SKIP_DIRS = {".git", ".cache", ".huggingface", "__pycache__"}


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_BUF):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


def digest(data) -> str:
    """sha256 of plain data in a canonical JSON form (sorted keys): the build and verify keys."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def source_files(src: Path) -> list[Path]:
    src = Path(src)
    return sorted(p for p in src.rglob("*")
                  if p.is_file() and not _SKIP_DIRS & set(p.relative_to(src).parts[:-1]))


def fingerprint_source(src: Path, known: dict | None = None, progress: bool = False) -> tuple[dict, dict]:
    """Every file of the checkpoint `src` with size and sha256, and the digest over them all.

    `known`: {relative path: [size, mtime_ns, sha256]} from an earlier run; a file whose size and
    modification time are unchanged keeps its hash instead of being read again (as make and rsync
    decide). Returns the source record for the manifest and the updated `known` table."""
    src = Path(src)
    files = source_files(src)
    known = known or {}
    todo = []
    for p in files:
        rel = p.relative_to(src).as_posix()
        st = p.stat()
        k = known.get(rel)
        if not (k and k[0] == st.st_size and k[1] == st.st_mtime_ns):
            todo.append((p, rel, st))
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=sum(st.st_size for _, _, st in todo), unit="B", unit_scale=True, desc="hashing source",
                   leave=False)
    table = {rel: v for rel, v in known.items() if (src / rel).is_file()}
    for p, rel, st in todo:
        table[rel] = [st.st_size, st.st_mtime_ns, sha256_file(p, bar.update if bar else None)]
    if bar:
        bar.close()
    rels = [p.relative_to(src).as_posix() for p in files]
    entries = [{"path": rel, "size": table[rel][0], "sha256": table[rel][2]} for rel in rels]
    config = next((e["sha256"] for e in entries if e["path"] == "config.json"), None)
    record = {"path": str(src), "files": entries, "config_sha256": config,
              "digest": digest([[e["path"], e["size"], e["sha256"]] for e in entries])}
    return record, {e["path"]: table[e["path"]] for e in entries}
