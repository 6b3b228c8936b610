"""Importance matrices in llama.cpp's two file formats, and their use by the K-/I-quant writers.

- GGUF (llama-imatrix's default since 2025): `general.type = imatrix`, no architecture, per
  weight `<gguf name>.in_sum2` (f32, ne = [n_per_row, n_mat]: the sums of squared inputs per
  column, per expert for 3-D expert tensors) and `<gguf name>.counts` (f32, ne = [1, n_mat]:
  the tokens each matrix saw), names sorted; `imatrix.datasets`, `imatrix.chunk_count`,
  `imatrix.chunk_size`.
- Legacy `.dat`: int32 entry count; per entry int32 name length, name, int32 ncall, int32 nval,
  float32[nval] (mean x ncall); then optionally int32 chunk count, int32 length, dataset name.

`importances()` normalizes them exactly as llama-quantize's `load_imatrix` does (GGUF: sum /
count per expert row, 1.0 where an expert saw no token; legacy: value / ncall), in float32,
so the quantizer sees the same numbers llama-quantize would hand it. Written by hand because
llama.cpp's loader lives in its `common` library, which llama-cpp-python does not ship.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError
from ..gguf_file import GGUF_MAGIC, open_gguf
from .gguf_write import new_writer
from .quant_policy import FLOAT_TYPES, Q

KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
_SUM, _COUNT = ".in_sum2", ".counts"
# quantized types that llama.cpp refuses to make without importances (tensor_requires_imatrix)
_NEEDS_IMATRIX = {Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ1_M, Q.IQ1_S}


@dataclass
class ImportanceMatrix:
    """Per GGUF weight name: squared-input sums [n_mat, n_per_row] and token counts [n_mat]."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False
    path: Path | None = None

    def importances(self) -> dict[str, np.ndarray]:
        """What llama-quantize passes to the quantizer: float32, flat (n_mat * n_per_row)."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name].astype(np.float32)
            if self.legacy:
                flat = s.reshape(-1)
                out[name] = (flat / c[0]).astype(np.float32) if c[0] > 0 else flat.astype(np.float32)
                continue
            rows = s.reshape(len(c), -1).astype(np.float32)
            norm = np.where(c[:, None] > 0, rows / np.where(c > 0, c, np.float32(1))[:, None], np.float32(1))
            out[name] = norm.astype(np.float32).reshape(-1)
        return out

    def starved(self) -> dict[str, int]:
        """Entries with matrices (experts) that saw no token: name -> how many."""
        if self.legacy:
            return {}
        return {n: int((c == 0).sum()) for n, c in self.counts.items() if (c == 0).any()}


def read_imatrix(path: Path) -> ImportanceMatrix:
    """Read an importance matrix in llama.cpp's GGUF format or its legacy .dat format."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"importance matrix {path} not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    im = _read_gguf(path) if magic == GGUF_MAGIC else _read_legacy(path)
    if not im.sums:
        raise InputError(f"importance matrix {path} has no entries")
    for name, s in im.sums.items():
        if not np.isfinite(s).all() or (s < 0).any():
            raise InputError(f"importance matrix {path}: entry {name} has negative or non-finite values")
    im.path = path
    return im


def _read_gguf(path: Path) -> ImportanceMatrix:
    import gguf

    reader = open_gguf(path)
    pairs: dict[str, dict[str, object]] = {}
    for t in reader.tensors:
        for suffix in (_SUM, _COUNT):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise InputError(f"importance matrix {path}: {t.name} is {t.tensor_type.name}, must be F32")
                pairs.setdefault(t.name[: -len(suffix)], {})[suffix] = t
    sums, counts = {}, {}
    for name, p in sorted(pairs.items()):
        if _SUM not in p or _COUNT not in p:
            raise InputError(f"importance matrix {path}: {name} has sums without counts or counts without sums")
        s = np.array(p[_SUM].data, dtype=np.float32).reshape(-1)
        c = np.rint(np.array(p[_COUNT].data, dtype=np.float32).reshape(-1)).astype(np.int64)
        if not len(c) or s.size % len(c):
            raise InputError(f"importance matrix {path}: {name} has {s.size} sums for {len(c)} counts")
        sums[name], counts[name] = s.reshape(len(c), -1), c

    def field(key: str, default):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    datasets = field(KEY_DATASETS, [])
    return ImportanceMatrix(sums, counts, list(datasets) if isinstance(datasets, list) else [str(datasets)],
                            int(field(KEY_CHUNK_COUNT, 0)), int(field(KEY_CHUNK_SIZE, 0)))


def _read_legacy(path: Path) -> ImportanceMatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise InputError(f"importance matrix {path} is truncated (or not an imatrix file): cut inside {what}")
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n,) = take("<i", "the entry count")
    if n < 1 or n > 1_000_000:
        raise InputError(f"{path} is neither a GGUF nor a legacy .dat importance matrix (entry count {n})")
    sums, counts = {}, {}
    for i in range(n):
        (length,) = take("<i", f"entry {i + 1}'s name length")
        if not 0 < length <= 1024:
            raise InputError(f"importance matrix {path}: entry {i + 1} has a name length of {length}")
        (raw,) = take(f"<{length}s", f"entry {i + 1}'s name")
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"importance matrix {path}: entry {i + 1}'s name is not UTF-8") from None
        ncall, nval = take("<ii", f"entry {name}'s header")
        if nval < 1:
            raise InputError(f"importance matrix {path}: entry {name} has {nval} values")
        values = take(f"<{nval}f", f"entry {name}'s values")
        sums[name] = np.array(values, dtype=np.float32).reshape(1, -1)
        counts[name] = np.array([ncall], dtype=np.int64)
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):  # the trailer is optional
        (chunk_count,) = take("<i", "the chunk count")
        if pos + 4 <= len(data):
            (length,) = take("<i", "the dataset name length")
            if 0 < length <= len(data) - pos:
                datasets = [data[pos : pos + length].decode("utf-8", errors="replace")]
    return ImportanceMatrix(sums, counts, datasets, chunk_count, 0, legacy=True)


def write_imatrix(path: Path, im: ImportanceMatrix) -> None:
    """Write `im` in llama.cpp's GGUF imatrix format at `path` (call inside an output transaction)."""
    import gguf

    w = new_writer(Path(path), "imatrix")
    w.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # imatrix files have no architecture
    w.add_type("imatrix")
    w.add_array(KEY_DATASETS, list(im.datasets) or ["unknown"])
    w.add_uint32(KEY_CHUNK_COUNT, int(im.chunk_count))
    w.add_uint32(KEY_CHUNK_SIZE, int(im.chunk_size))
    for name in sorted(im.sums):
        s = np.ascontiguousarray(im.sums[name], dtype=np.float32)
        c = np.ascontiguousarray(im.counts[name], dtype=np.float32).reshape(-1, 1)
        w.add_tensor(name + _SUM, s.reshape(len(c), -1))
        w.add_tensor(name + _COUNT, c)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def requires_imatrix(name: str, qtype: Q) -> bool:
    """llama.cpp's tensor_requires_imatrix (outside Q2_K_S files, which mtool does not make)."""
    return qtype in _NEEDS_IMATRIX and name not in ("token_embd.weight", "output.weight")


def importances_for(im: ImportanceMatrix | None, planned: dict[str, tuple[tuple[int, ...], Q]],
                    outtype: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Match `im` to the tensors of the file being written.

    `planned`: GGUF name -> (torch-order shape, chosen type) of every tensor of the file (routers
    and norms have entries too; only the quantized ones use them).
    Returns the importances by name (flat, n_mat x n_per_row) and notes. An importance matrix of
    another model (unknown names, wrong sizes) and a tensor whose type needs importances but has
    none are refused before any work, naming the entry."""
    where = f"importance matrix {im.path}" if im is not None and im.path else "the importance matrix"
    tensors = {n: (shape, q) for n, (shape, q) in planned.items() if q not in FLOAT_TYPES}
    if im is None:
        need = next((n for n, (_, q) in tensors.items() if requires_imatrix(n, q)), None)
        if need:
            raise UsageError(f"--outtype {outtype} quantizes {need} as {tensors[need][1].name}, which needs an "
                             f"importance matrix: give --imatrix FILE (make one with `mtool imatrix`)")
        return {}, []
    imp = im.importances()
    strangers = [n for n in imp if n not in planned]
    if strangers and len(strangers) == len(imp):
        raise InputError(f"{where} belongs to another model: none of its entries (e.g. {strangers[0]}) "
                         f"is a tensor of this one")
    if strangers:
        raise InputError(f"{where} belongs to another model: it has an entry for {strangers[0]}, "
                         f"which this model does not have")
    out = {}
    for name, (shape, qtype) in tensors.items():
        values = imp.get(name)
        if values is None:
            if requires_imatrix(name, qtype):
                raise InputError(f"{where} has no entry for {name}, which --outtype {outtype} quantizes as "
                                 f"{qtype.name}")
            continue
        n_mat = shape[0] if len(shape) == 3 else 1
        if values.size != n_mat * shape[-1]:
            raise InputError(f"{where} belongs to another model: {name} has {values.size} importances, "
                             f"the tensor needs {n_mat} x {shape[-1]}")
        out[name] = values
    notes = []
    missing = [n for n in tensors if n not in out and n not in ("token_embd.weight", "output.weight")]
    if missing:
        notes.append(f"{where} has no entry for {len(missing)} quantized tensor(s) (e.g. {missing[0]}); "
                     f"they are quantized without importances, as llama-quantize does")
    for name, k in im.starved().items():
        if name in out:
            notes.append(f"{where}: {k} expert(s) of {name} saw no calibration token; their importances are 1.0")
    return out, notes


def add_imatrix_metadata(w, im: ImportanceMatrix) -> None:
    """The `quantize.imatrix.*` keys llama-quantize writes (u32 counts, as it does; the entry
    count is that of the file, used or not)."""
    w.add_string("quantize.imatrix.file", str(im.path) if im.path else "imatrix")
    if im.datasets:
        w.add_string("quantize.imatrix.dataset", im.datasets[0])
    w.add_uint32("quantize.imatrix.entries_count", len(im.sums))
    if im.chunk_count > 0:
        w.add_uint32("quantize.imatrix.chunks_count", im.chunk_count)
