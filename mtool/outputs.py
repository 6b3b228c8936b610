"""Safe outputs: refuse to overwrite, check disk space, write atomically.

Every writer in mtool writes into a temporary sibling of its target and renames it
into place only when everything succeeded, so a failure or Ctrl-C never leaves a
half-written artifact under the requested name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import MtoolError

# Headroom on top of the estimated output size when checking free space.
_SPACE_MARGIN = 1.05


def check_output_path(out: Path, *, force: bool, sources: Iterable[Path] = (), related: Iterable[Path] = ()) -> None:
    """Refuse outputs that exist (without force), live inside a source, or lack a parent dir."""
    out = Path(out)
    for src in sources:
        src_r, out_r = Path(src).resolve(), out.resolve()
        if out_r == src_r or src_r in out_r.parents:
            raise MtoolError(f"output {out} is inside the source {src}; choose another location")
    if not out.parent.exists():
        raise MtoolError(f"output directory {out.parent} does not exist")
    existing = [p for p in (out, *related) if Path(p).exists()]
    if existing and not force:
        raise MtoolError(f"output {existing[0]} already exists; pass --force to overwrite it")


def check_free_space(target_dir: Path, needed_bytes: int) -> None:
    """Fail before any work when the target filesystem cannot hold the output."""
    free = shutil.disk_usage(target_dir).free
    if needed_bytes * _SPACE_MARGIN > free:
        raise MtoolError(
            f"not enough disk space in {target_dir}: need about {needed_bytes / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free"
        )


def fsync_path(path: Path) -> None:
    """Flush a written file to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging_dir(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out` (same filesystem, so renames are atomic).

    It is removed on exit whatever happened; callers move finished files out of it.
    """
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".mtool-tmp", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def commit_files(staged: Iterable[Path], dest_dir: Path, *, replace: Iterable[Path] = ()) -> list[Path]:
    """Move finished files into dest_dir, after removing the old files they replace."""
    staged = list(staged)
    for p in staged:
        fsync_path(p)
    for old in replace:
        old = Path(old)
        if old.is_dir():
            shutil.rmtree(old)
        elif old.exists():
            old.unlink()
    final = []
    for p in staged:
        target = Path(dest_dir) / p.name
        os.replace(p, target)
        final.append(target)
    return final


def commit_dir(staged_dir: Path, out: Path, *, force: bool) -> Path:
    """Rename a finished staging directory to `out`, replacing it only with force."""
    out = Path(out)
    for p in staged_dir.rglob("*"):
        if p.is_file():
            fsync_path(p)
    if out.exists():
        if not force:
            raise MtoolError(f"output {out} already exists; pass --force to overwrite it")
        backup = out.with_name(f".{out.name}.mtool-old")
        os.replace(out, backup)
        os.replace(staged_dir, out)
        shutil.rmtree(backup, ignore_errors=True) if backup.is_dir() else backup.unlink()
    else:
        os.replace(staged_dir, out)
    return out
