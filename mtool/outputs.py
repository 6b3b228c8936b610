"""Safe outputs: one transaction per artifact, so a failure never hurts anything.

Every writer in mtool works inside `output_transaction(out, ...)`:

- OUT may not equal, contain or lie inside any source (symlinks resolved), with or without
  --force: a --force run must never be able to delete its own inputs.
- A lock beside OUT (`.NAME.mtool-lock`, flock) makes a second writer to the same OUT fail
  at once instead of both claiming the file.
- Work happens in a staging folder beside OUT (same filesystem, so the final rename is
  atomic) whose name records its owner (`.NAME.mtool-tmp.PID@HOST.xxxx`). It is removed on
  success, error, Ctrl-C and SIGTERM; one left by a killed process is removed by the next
  run for the same OUT, which says so.
- The old OUT is replaced only once the new one is complete (renamed over, then the
  leftovers of the old one removed), so --force never deletes before it has a replacement.
- Folders are created with the permissions the umask allows (not tempfile's 0700).
- OSError while writing (ENOSPC, EROFS, EACCES, EFBIG...) becomes one OutputError naming OUT.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OutputError

log = logging.getLogger("mtool")

# Proportional headroom on the estimated output size (filesystem blocks, metadata); no fixed
# allowance, so a small output still fits a small disk.
_SPACE_MARGIN = 1.02
_STAGING = re.compile(r"^\.(?P<name>.+)\.mtool-tmp\.(?P<pid>\d+)@(?P<host>[^.]+)\.[A-Za-z0-9_-]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(old)
    return old


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_path(out: Path, *, force: bool, sources: Iterable[Path] = (), related: Iterable[Path] = ()) -> None:
    """Refuse an OUT that overlaps a source (always), exists (without force), or has no parent dir."""
    out = Path(out)
    out_r = out.resolve()
    for src in sources:
        if src is None:
            continue
        src_r = Path(src).resolve()
        if _overlaps(out_r, src_r):
            how = "is" if out_r == src_r else "is inside" if src_r in out_r.parents else "contains"
            what = "the source" if out_r != src_r and src_r in out_r.parents else "the input"
            raise OutputError(f"output {out} {how} {what} {src}; choose an output outside every input")
    parent = out_r.parent
    if not parent.exists():
        raise OutputError(f"output directory {out.parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"output directory {out.parent} is not a directory")
    existing = [p for p in (out, *related) if Path(p).exists() or Path(p).is_symlink()]
    if existing and not force:
        raise OutputError(f"output {existing[0]} already exists; pass --force to overwrite it")


def check_free_space(target_dir: Path, needed_bytes: int) -> None:
    """Fail before any work when the target filesystem cannot hold the output."""
    free = shutil.disk_usage(target_dir).free
    if needed_bytes * _SPACE_MARGIN > free:
        raise OutputError(
            f"not enough disk space in {target_dir}: need about {needed_bytes / 2**20:.1f} MiB, "
            f"{free / 2**20:.1f} MiB free"
        )


def fsync_path(path: Path) -> None:
    """Flush a written file to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    """flock on `.NAME.mtool-lock` beside OUT; the file is removed on release.

    After locking, the path must still name the locked inode: otherwise a releasing owner
    unlinked it between our open and our flock, and we start again on the new file."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.mtool-lock"
        self.fd = -1

    def acquire(self, out: Path) -> None:
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise OutputError(_describe_oserror(out, e)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputError(f"output {out} is being written by another mtool process ({owner}); "
                                  f"wait for it or choose another output") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}@{_host()}".encode(), 0)
                self.fd = fd
                return
            os.close(fd)
        raise OutputError(f"could not lock {self.path}")

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = -1


@contextlib.contextmanager
def output_lock(out: Path):
    """Hold the lock of OUT (a file or a folder such as a release directory) while the block runs."""
    lock = _Lock(Path(out))
    lock.acquire(Path(out))
    try:
        yield
    finally:
        lock.release()


def _remove_stale_staging(out: Path) -> list[str]:
    """Staging folders of this OUT left by dead processes on this host (we hold the lock)."""
    notes = []
    host = _host()
    for p in out.parent.iterdir():
        m = _STAGING.match(p.name)
        if not m or m["name"] != out.name:
            continue
        pid = int(m["pid"])
        if m["host"] == host and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            notes.append(f"removed {p.name}, unfinished output of process {pid} which no longer runs")
        else:
            notes.append(f"left {p.name} alone: it belongs to process {pid} on {m['host']}")
    return notes


def _make_staging(out: Path) -> Path:
    path = out.parent / f".{out.name}.mtool-tmp.{os.getpid()}@{_host()}.{secrets.token_hex(4)}"
    path.mkdir(mode=0o777 & ~current_umask())
    return path


@dataclass
class Transaction:
    """The open output transaction: `dir` is the staging folder; `notes` what was cleaned up."""

    out: Path
    dir: Path
    notes: list[str] = field(default_factory=list)


def _describe_oserror(out: Path, e: OSError) -> str:
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EFBIG: "file too large for this file system or process limit",
    }.get(e.errno, e.strerror or str(e))
    return f"cannot write {out}: {reason}; nothing was written"


@contextlib.contextmanager
def output_transaction(out: Path, *, force: bool, sources: Iterable[Path] = (), related: Iterable[Path] = (),
                       needed_bytes: int = 0) -> Iterator[Transaction]:
    """Checks, lock, stale-staging cleanup, free-space check and a staging folder for `out`.

    The caller writes into `tx.dir` and commits with `commit_dir` / `commit_files` before the
    block ends; whatever happens, the staging folder is gone and the lock released after it."""
    out = Path(out)
    sources, related = list(sources), list(related)
    check_output_path(out, force=force, sources=sources, related=related)
    lock = _Lock(out)
    lock.acquire(out)
    staging: Path | None = None
    try:
        notes = _remove_stale_staging(out)
        for n in notes:
            log.warning(n)
        check_output_path(out, force=force, sources=sources, related=related)  # again, under the lock
        if needed_bytes:
            check_free_space(out.parent, needed_bytes)
        try:
            staging = _make_staging(out)
        except OSError as e:
            raise OutputError(_describe_oserror(out, e)) from None
        try:
            yield Transaction(out, staging, notes)
        except OSError as e:
            if e.filename and not _inside(Path(e.filename), staging, out):
                raise  # a read error on an input, not an output failure
            raise OutputError(_describe_oserror(out, e)) from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        lock.release()


def _inside(path: Path, *roots: Path) -> bool:
    try:
        p = Path(path).resolve()
    except OSError:
        return False
    return any(p == r.resolve() or r.resolve() in p.parents for r in roots)


def commit_files(staged: Iterable[Path], dest_dir: Path, *, replace: Iterable[Path] = ()) -> list[Path]:
    """Move finished files into dest_dir, then remove the old files they replace.

    New files are renamed over same-named old ones (atomic); old files with other names
    (e.g. shards of a different split) are removed only after every new file is in place."""
    staged = list(staged)
    for p in staged:
        fsync_path(p)
    final = []
    for p in staged:
        target = Path(dest_dir) / p.name
        os.replace(p, target)
        final.append(target)
    for old in replace:
        old = Path(old)
        if old in final:
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    return final


def commit_dir(staged_dir: Path, out: Path, *, force: bool) -> Path:
    """Rename a finished staging directory to `out`, replacing it only with force.

    The old `out` is first renamed aside, the new one renamed in, and only then is the old
    one removed: at every moment either the old or the new output is complete under `out`."""
    out = Path(out)
    for p in staged_dir.rglob("*"):
        if p.is_file():
            fsync_path(p)
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputError(f"output {out} already exists; pass --force to overwrite it")
        backup = out.parent / f".{out.name}.mtool-old.{os.getpid()}"
        os.replace(out, backup)
        try:
            os.replace(staged_dir, out)
        except OSError:
            os.replace(backup, out)
            raise
        shutil.rmtree(backup, ignore_errors=True) if backup.is_dir() and not backup.is_symlink() else backup.unlink()
    else:
        os.replace(staged_dir, out)
    return out


def write_report(path: Path, text: str) -> Path:
    """Write a small report file (verify --json) atomically; reports are replaced freely."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.mtool-tmp.{os.getpid()}@{_host()}.{secrets.token_hex(4)}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise OutputError(_describe_oserror(path, e)) from None
    return path


def check_report_path(path: Path, option: str) -> None:
    """A report destination that can be written, checked before any work."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file name")
    if not path.parent.resolve().is_dir():
        raise OutputError(f"{option} {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"{option} {path}: directory {path.parent} is not writable")
