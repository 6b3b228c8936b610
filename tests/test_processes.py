"""The error contract with real processes: signals, concurrent writers, umask, full and
read-only disks. Each runs the `mtool` console script as a user or CI would."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .bigmodel import make_slow_llama
from .test_error_contract import sha_tree

MTOOL = [sys.executable, "-m", "mtool.cli"]


def _env(**extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("MTOOL_DEBUG", None)
    return env


@pytest.fixture(scope="module")
def slow_model(gqa_model, tmp_path_factory):
    """~300 MB of random f32 weights: a q4_0 conversion takes several seconds."""
    return make_slow_llama(tmp_path_factory.mktemp("slow") / "model", gqa_model, layers=24)


def _leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _start(src, out, *extra, preexec=None):
    def child_setup():
        # a test runner started in the background (nohup, `cmd &` in a script) hands its children SIGINT
        # ignored, and Python then installs no Ctrl-C handler: give the child the default disposition
        # an interactive user's mtool has
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec:
            preexec()

    return subprocess.Popen(MTOOL + ["convert", str(src), "-o", str(out), "--outtype", "q4_0", "-q", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=child_setup)


def _wait_for_staging(proc, out, timeout=60.0, stop=True):
    """Wait until `proc` has created its staging folder, then freeze it (SIGSTOP) so that what
    the test does next happens while the write is certainly in progress."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(".mtool-tmp." in n for n in _leftovers(out)):
            if stop:
                proc.send_signal(signal.SIGSTOP)
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended before staging appeared: {proc.communicate()}")
        time.sleep(0.005)
    raise AssertionError("no staging folder appeared")


def test_source_inside_output_is_refused_in_a_real_process(gqa_model, tmp_path):
    import shutil

    p = tmp_path / "p"
    src = p / "src"
    shutil.copytree(gqa_model, src)
    before = sha_tree(p)
    r = subprocess.run(MTOOL + ["convert", str(src), "-o", str(p), "--to", "hf", "--force"],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert sha_tree(p) == before


@pytest.mark.parametrize("sig, code, message", [(signal.SIGTERM, 143, "terminated"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_signal_cleans_up(slow_model, tmp_path, sig, code, message):
    out = tmp_path / "o.gguf"
    before = sha_tree(slow_model)
    proc = _start(slow_model, out)
    _wait_for_staging(proc, out)
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert message in err and "Traceback" not in err, err
    assert not out.exists() and _leftovers(out) == []
    assert sha_tree(slow_model) == before


def test_interrupted_quantize_cleans_up(slow_model, tmp_path):
    """Ctrl-C during `mtool quantize`, whose tensors are queued on the quantizer threads ahead of
    the writer: exit 130, one line, no output, nothing left behind, the input untouched."""
    from mtool.convert.gguf_export import export_gguf
    from mtool.model.families import load_canonical

    src = tmp_path / "m-bf16.gguf"
    export_gguf(load_canonical(slow_model), src, outtype="bf16", progress=False)
    before = src.read_bytes()
    out = tmp_path / "q.gguf"
    proc = subprocess.Popen(MTOOL + ["quantize", str(src), "-o", str(out), "--outtype", "q4_k_m", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_staging(proc, out)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists() and _leftovers(out) == []
    assert src.read_bytes() == before


def test_sigkill_leftover_is_removed_by_the_next_run(slow_model, tmp_path):
    out = tmp_path / "o.gguf"
    proc = _start(slow_model, out)
    _wait_for_staging(proc, out)
    proc.kill()
    proc.wait()
    left = _leftovers(out)
    assert any(f".mtool-tmp.{proc.pid}@" in n for n in left), left  # the owner is in the name
    r = subprocess.run(MTOOL + ["convert", str(slow_model), "-o", str(out), "--outtype", "f16", "-q"],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr
    assert f"unfinished output of process {proc.pid}" in r.stderr
    assert _leftovers(out) == [] and out.read_bytes()[:4] == b"GGUF"


def test_two_writers_to_one_output(slow_model, tmp_path):
    out = tmp_path / "o.gguf"
    first = _start(slow_model, out)
    _wait_for_staging(first, out)
    second = subprocess.run(MTOOL + ["convert", str(slow_model), "-o", str(out), "--outtype", "q4_0", "-q", "--force"],
                            capture_output=True, text=True, env=_env())
    first.send_signal(signal.SIGCONT)
    _, err1 = first.communicate(timeout=300)
    assert first.returncode == 0, err1
    assert second.returncode == 2 and "being written by another mtool process" in second.stderr, second.stderr
    assert _leftovers(out) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)])
def test_output_folders_honour_the_umask(gqa_model, tmp_path, umask, mode):
    out = tmp_path / "hf"
    r = subprocess.run(MTOOL + ["convert", str(gqa_model), "-o", str(out), "--to", "hf", "-q"],
                       capture_output=True, text=True, env=_env(), preexec_fn=lambda: os.umask(umask))
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o777 == mode
    assert (out / "config.json").stat().st_mode & 0o777 == mode & 0o666


def test_file_size_limit_mid_write_is_one_line(slow_model, tmp_path):
    """A write that fails half-way (here: RLIMIT_FSIZE, EFBIG) is an output error, nothing left."""
    out = tmp_path / "o.gguf"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000_000, 20_000_000))

    proc = _start(slow_model, out, preexec=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith(f"error: cannot write {out}"), err
    assert not out.exists() and _leftovers(out) == []


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    if not _mount_tmpfs(d, "size=40m"):
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE test covers the mid-write path)")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_disk_full_mid_write(slow_model, small_disk):
    """The estimate cannot know about other writers: the disk fills up while we write."""
    filler = small_disk / "filler"
    out = small_disk / "o.gguf"
    proc = _start(slow_model, out, "--outtype", "q8_0")  # q8_0 of 300 MB f32: ~80 MB; 40 MB disk
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and ("not enough disk space" in err or "no space left" in err), err
    # an output the space check admits, while someone else fills the disk during the write
    small = make_slow_llama(small_disk.parent / "small_src", slow_model, layers=2)  # ~30 MB of f32
    out2 = small_disk / "small"
    proc = subprocess.Popen(MTOOL + ["convert", str(small), "-o", str(out2), "--to", "hf", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_staging(proc, out2)
    try:
        with open(filler, "wb", buffering=0) as fh:  # take every free byte (unbuffered: close cannot fail)
            try:
                while True:
                    fh.write(b"\0" * (1 << 20))
            except OSError:
                pass
    finally:
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "no space left on the device" in err, err
    assert not out2.exists() and _leftovers(out2) == []


def test_small_output_fits_a_small_disk(gqa_model, small_disk):
    out = small_disk / "o.gguf"
    r = subprocess.run(MTOOL + ["convert", str(gqa_model), "-o", str(out), "--outtype", "q8_0", "-q"],
                       capture_output=True, text=True, env=_env())
    assert r.returncode == 0, r.stderr


def test_read_only_output_directory(gqa_model, tmp_path):
    d = tmp_path / "ro"
    if not _mount_tmpfs(d, "size=10m,ro"):
        pytest.skip("mounting a read-only tmpfs needs root")
    try:
        r = subprocess.run(MTOOL + ["convert", str(gqa_model), "-o", str(d / "o.gguf"), "-q"],
                           capture_output=True, text=True, env=_env())
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "read-only" in r.stderr and str(d / "o.gguf") in r.stderr, r.stderr
    finally:
        subprocess.run(["umount", str(d)], check=False)
