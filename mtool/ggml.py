"""libggml's quantizers, called directly: the exact kernels llama.cpp's own quantizer runs.

llama-cpp-python ships libggml-base beside libllama but binds only `llama_model_quantize`
(whole files); mtool streams tensors from an HF checkpoint, so it calls `ggml_quantize_chunk`
itself through ctypes. This is the thin, checked binding: libggml aborts the whole process
(GGML_ASSERT) on a bad call, so every precondition is checked here in Python first, and
errors come back as MtoolError. ctypes releases the GIL during each call, so chunks of rows
are quantized on worker threads, all cores busy.

The library is found in `llama_cpp/lib` of the installed llama-cpp-python, or in the folder
named by LLAMA_CPP_LIB_PATH (versioned names such as libggml-base.so.0 are accepted).

Float conversions (bf16/f16 <-> f32) use libggml-cpu's vectorized row converters beside it
(4-5 billion values/s on one core here, against ~0.5-0.7 for torch's and ~0.3 for numpy's;
the same IEEE round-to-nearest-even, checked against numpy in the tests); numpy does them
where that library is absent (builds that name it per CPU variant).
"""

from __future__ import annotations

import ctypes
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor, wait
from functools import lru_cache
from pathlib import Path

import numpy as np

from .buffers import scratch
from .dtypes import BY_NAME
from .errors import InputError, MtoolError, UsageError

_LIB_NAMES = {"linux": ("libggml-base.so", "libggml-base.so.*"), "darwin": ("libggml-base.dylib", "libggml-base.*.dylib"),
              "win32": ("ggml-base.dll",)}
# symbol -> (restype, argtypes); type ids are ggml's `enum ggml_type` (= gguf.GGMLQuantizationType)
_SIGNATURES = {
    "ggml_quantize_chunk": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                              ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]),
    "ggml_quantize_requires_imatrix": (ctypes.c_bool, [ctypes.c_int]),
    "ggml_quantize_init": (None, [ctypes.c_int]),
    "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
    "ggml_blck_size": (ctypes.c_int64, [ctypes.c_int]),
    "ggml_type_size": (ctypes.c_size_t, [ctypes.c_int]),
    "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]),
}
# values per quantizer job (whole rows): big enough to amortize a job's Python overhead (~20 us),
# small enough that its float32 rows stay in cache between conversion and quantization
_JOB_VALUES = 1 << 18
_CPU_LIB_NAMES = ("libggml-cpu.so", "libggml-cpu.so.*", "libggml-cpu.dylib", "libggml-cpu.*.dylib", "ggml-cpu.dll")
# ggml_cpu_<from>_to_<to>(const void * x, void * y, int64_t n)
_CONVERTERS = {("bfloat16", "float32"): "ggml_cpu_bf16_to_fp32", ("float16", "float32"): "ggml_cpu_fp16_to_fp32",
               ("float32", "float16"): "ggml_cpu_fp32_to_fp16", ("float32", "bfloat16"): "ggml_cpu_fp32_to_bf16"}


def library_dir() -> Path:
    """Where libggml-base is looked for."""
    env = os.environ.get("LLAMA_CPP_LIB_PATH")
    if env:
        return Path(env)
    import importlib.util

    # located, not imported: importing llama_cpp (0.2 s) would load libllama, which is not needed here
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise MtoolError("llama-cpp-python is not installed; mtool encodes GGUF tensors with its libggml")
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _find_library(folder: Path) -> Path:
    platform = "linux" if sys.platform.startswith("linux") else sys.platform
    for pattern in _LIB_NAMES.get(platform, _LIB_NAMES["linux"]):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    raise MtoolError(f"libggml-base not found in {folder} (set LLAMA_CPP_LIB_PATH to the folder that holds it)")


class GGML:
    """The loaded library with typed, checked wrappers."""

    def __init__(self, path: Path):
        try:
            self.path = Path(path)
            self.lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise MtoolError(f"cannot load {path}: {e}") from None
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(self.lib, name, None)
            if fn is None:
                raise MtoolError(f"{path} has no {name}: llama-cpp-python is too old (need >= 0.3.16)")
            fn.restype, fn.argtypes = res, args
        self.path = path
        self._initialized: set[int] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._convert = self._load_converters(Path(path).parent)

    @staticmethod
    def _load_converters(folder: Path) -> dict[tuple[str, str], object]:
        for pattern in _CPU_LIB_NAMES:
            found = sorted(folder.glob(pattern))
            if found:
                break
        else:
            return {}
        try:
            cpu = ctypes.CDLL(str(found[0]))
            cpu.ggml_cpu_init.restype, cpu.ggml_cpu_init.argtypes = None, []
            cpu.ggml_cpu_init()
            fns = {}
            for key, name in _CONVERTERS.items():
                fn = getattr(cpu, name)
                fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
                fns[key] = fn
            return fns
        except (OSError, AttributeError):  # an older or differently built library: numpy converts
            return {}

    def convert(self, x: np.ndarray, src: str, dst: str, out: np.ndarray | None = None) -> np.ndarray:
        """Values of `x` (numpy storage of dtype `src`: float32, float16, bfloat16 as uint16 bits)
        as storage of `dst`, rounded to nearest even; into `out` when given (same element count)."""
        x = np.ascontiguousarray(x)
        if out is None:
            out = np.empty(x.shape, dtype=BY_NAME[dst].np_storage)
        if x.dtype != BY_NAME[src].np_storage or out.dtype != BY_NAME[dst].np_storage:
            raise ValueError(f"convert {src} -> {dst}: storage is {x.dtype} -> {out.dtype}")
        if x.size != out.size or not out.flags.c_contiguous:
            raise ValueError("convert: output must be contiguous and as large as the input")
        if src == dst:
            out.reshape(-1)[:] = x.reshape(-1)
        elif src != "float32" and dst != "float32":  # via float32, a chunk at a time
            step = 1 << 20
            tmp = np.empty(min(step, x.size), dtype=np.float32)
            xf, of = x.reshape(-1), out.reshape(-1)
            for i in range(0, x.size, step):
                t = tmp[: min(step, x.size - i)]
                self.convert(xf[i : i + t.size], src, "float32", t)
                self.convert(t, "float32", dst, of[i : i + t.size])
        elif (src, dst) in self._convert:
            self._convert[(src, dst)](x.ctypes.data, out.ctypes.data, x.size)
        else:
            out.reshape(-1)[:] = _numpy_convert(x.reshape(-1), src, dst)
        return out

    def pool(self) -> ThreadPoolExecutor:
        """One pool of quantizer threads for the process (threads are not started per tensor)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="ggml")
        return self._pool

    def type_name(self, qtype: int) -> str:
        return self.lib.ggml_type_name(int(qtype)).decode()

    def block_size(self, qtype: int) -> int:
        return int(self.lib.ggml_blck_size(int(qtype)))

    def type_size(self, qtype: int) -> int:
        return int(self.lib.ggml_type_size(int(qtype)))

    def row_size(self, qtype: int, n_per_row: int) -> int:
        self._check_row(qtype, n_per_row)
        return int(self.lib.ggml_row_size(int(qtype), int(n_per_row)))

    def requires_imatrix(self, qtype: int) -> bool:
        return bool(self.lib.ggml_quantize_requires_imatrix(int(qtype)))

    def _check_row(self, qtype: int, n_per_row: int) -> None:
        blck = self.block_size(qtype)
        if blck <= 0 or self.type_size(qtype) <= 0:
            raise UsageError(f"ggml type {qtype} is not a quantization type of this libggml")
        if n_per_row <= 0 or n_per_row % blck:
            raise UsageError(f"rows of {n_per_row} values cannot be stored as {self.type_name(qtype)} "
                             f"(blocks of {blck})")

    def quantize(self, x: np.ndarray, qtype: int, imatrix: np.ndarray | None = None, *, src: str = "float32",
                 threads: int = 0, name: str = "tensor", out: np.ndarray | None = None) -> np.ndarray:
        """Quantize the rows of `x` (numpy storage of `src`: float32, float16 or bfloat16 bits,
        [..., n_per_row]) as `qtype`; returns the GGUF bytes as uint8 [rows, row_size] (in `out`
        when given). `imatrix`: one importance per column. `threads`: 1 runs on this thread, N on a
        pool of N, 0 on the process's pool."""
        if threads:
            job = self._jobs(x, qtype, imatrix, src, name, out)
            if threads == 1:
                written = sum(job.run(r0) for r0 in job.starts)
            else:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    written = sum(pool.map(job.run, job.starts))
            return job.check(written)
        return self.submit(x, qtype, imatrix, src=src, name=name, out=out).result()

    def submit(self, x: np.ndarray, qtype: int, imatrix: np.ndarray | None = None, *, src: str = "float32",
               name: str = "tensor", out: np.ndarray | None = None) -> "Pending":
        """`quantize` queued on the process's pool; `.result()` waits and returns the bytes. Jobs queue
        behind those submitted before, so a caller that submits the next tensor before waiting on
        this one keeps the quantizer threads busy across tensors (no barrier between them)."""
        job = self._jobs(x, qtype, imatrix, src, name, out)
        return Pending(job, [self.pool().submit(job.run, r0) for r0 in job.starts])

    def _jobs(self, x: np.ndarray, qtype: int, imatrix: np.ndarray | None, src: str, name: str,
              out: np.ndarray | None) -> "_Jobs":
        qtype = int(qtype)
        if src not in BY_NAME or BY_NAME[src].np_storage not in (np.float32, np.float16, np.uint16):
            raise ValueError(f"quantize: source type {src} is not float32, float16 or bfloat16")
        x = np.ascontiguousarray(x)
        if x.dtype != BY_NAME[src].np_storage:
            raise ValueError(f"quantize: {src} values must be stored as {BY_NAME[src].np_storage}, not {x.dtype}")
        n_per_row = int(x.shape[-1]) if x.ndim else 0
        self._check_row(qtype, n_per_row)
        rows = x.size // n_per_row
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
            if imatrix.size != n_per_row:
                raise InputError(f"importance matrix for {name} has {imatrix.size} values, its rows have {n_per_row}")
            if not np.isfinite(imatrix).all() or (imatrix < 0).any():
                raise InputError(f"importance matrix for {name} has negative or non-finite values")
        elif self.requires_imatrix(qtype):
            raise UsageError(f"{self.type_name(qtype)} needs an importance matrix (--imatrix) for {name}")
        if qtype not in self._initialized:  # lookup tables of the I-quants; not thread-safe to build
            self.lib.ggml_quantize_init(qtype)
            self._initialized.add(qtype)
        row_size = int(self.lib.ggml_row_size(qtype, n_per_row))
        if out is None:
            out = np.empty((rows, row_size), dtype=np.uint8)
        elif out.dtype != np.uint8 or out.shape != (rows, row_size) or not out.flags.c_contiguous:
            raise ValueError(f"quantize: output must be contiguous uint8 {(rows, row_size)}")
        return _Jobs(self, x.reshape(rows, n_per_row), src, qtype, imatrix, out, name)


class _Jobs:
    """One tensor's quantization cut into jobs of whole rows. Each job converts its rows to float32
    in its thread's scratch (in cache) and quantizes them from there: the conversion runs on all
    quantizer threads instead of before them, and no float32 copy of the tensor exists."""

    def __init__(self, g: GGML, rows: np.ndarray, src: str, qtype: int, imatrix: np.ndarray | None,
                 out: np.ndarray, name: str):
        self.g, self.rows, self.src, self.qtype, self.imatrix, self.out, self.name = g, rows, src, qtype, imatrix, out, name
        self.step = max(1, _JOB_VALUES // rows.shape[1])
        self.starts = range(0, rows.shape[0], self.step)

    def run(self, r0: int) -> int:
        part, n_per_row = self.rows[r0 : r0 + self.step], self.rows.shape[1]
        if self.src != "float32":
            part = self.g.convert(part, self.src, "float32", scratch(part.shape, np.float32, slot="quantize"))
        imp = self.imatrix.ctypes.data if self.imatrix is not None else None
        dst = self.out.ctypes.data + r0 * self.out.shape[1]
        # `start` (values) is 0: libggml offsets src and dst by it; both are offset here already
        return int(self.g.lib.ggml_quantize_chunk(self.qtype, part.ctypes.data, dst, 0, len(part), n_per_row, imp))

    def check(self, written: int) -> np.ndarray:
        if written != self.out.nbytes:
            raise MtoolError(f"libggml wrote {written} bytes for {self.name}, expected {self.out.nbytes}")
        return self.out


class Pending:
    """Quantization queued on the pool (`GGML.submit`)."""

    def __init__(self, job: _Jobs, futures: list[Future]):
        self._job, self._futures = job, futures

    def result(self) -> np.ndarray:
        """Wait for every job (also when one failed: none may still write into the output) and
        return the bytes."""
        try:
            wait(self._futures)
        except BaseException:  # Ctrl-C / SIGTERM while waiting: the rest need not run
            self.cancel()
            raise
        return self._job.check(sum(f.result() for f in self._futures))

    def cancel(self) -> None:
        """Drop the jobs not started yet: an interrupted run must not wait at exit for the pool to
        quantize the rest of the tensor (the interpreter joins the pool's queued work)."""
        for f in self._futures:
            f.cancel()


def _numpy_convert(x: np.ndarray, src: str, dst: str) -> np.ndarray:
    if src == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    if dst == "bfloat16":  # round to nearest even on the upper 16 bits; NaN stays a quiet NaN
        u = x.astype(np.float32).view(np.uint32)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(x), ((u >> 16) | 0x40).astype(np.uint16), r)
    with np.errstate(over="ignore"):  # beyond float16's range -> inf, as libggml's cast
        return x.astype(np.float16 if dst == "float16" else np.float32)


@lru_cache(maxsize=1)
def ggml() -> GGML:
    """The process's libggml binding (loaded once)."""
    return GGML(_find_library(library_dir()))
