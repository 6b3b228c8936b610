"""Writing a GGUF file: header through gguf-py, tensor data through mtool.direct_write.

gguf-py's GGUFWriter lays out the header, the metadata and the tensor infos (and the split
shards); its `write_tensor_data` then appends each tensor with `ndarray.tofile` through the
page cache. `TensorData` takes over from there with the same layout rules (tensors in info
order, each shard's tensors in its own file, every tensor padded to the data alignment) but
writes through `SequentialWriter` (O_DIRECT where possible), which costs a fraction of the
CPU on small machines. A test checks the files are byte-identical to gguf-py's.

Nothing here imports torch: `mtool quantize` and the float/q8_0 conversion paths use it.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

from ..direct_write import FinishOrAbort, SequentialWriter
from ..outputs import commit_files
from .gguf_types import Q, encoded_nbytes, writer_shape_dtype


@dataclass
class GGUFResult:
    """What a conversion wrote, for the CLI summary."""

    files: list[Path]
    n_tensors: int
    bytes_out: int
    seconds: float
    type_counts: dict[str, int]
    notes: list[str] = field(default_factory=list)
    n_params: int = 0
    fallbacks: list[str] = field(default_factory=list)  # tensors written in a wider type than planned

    @property
    def n_fallbacks(self) -> int:
        return len(self.fallbacks)


# Source bytes read per piece of a tensor (GGUF conversion and re-quantization): the writer starts after
# the first piece instead of after a whole embedding (measured on the 0.25B bf16 model: 0.18 s with
# nothing to write while its 82 MB embedding was read), a 1 GB embedding or expert stack is never in
# memory whole, and the read buffers are small enough to recycle.
PIECE_BYTES = 16 * 2**20


def row_pieces(n_rows: int, row_bytes: int, align: int = 1) -> list[tuple[int, int]]:
    """(start, count) row ranges of about PIECE_BYTES covering `n_rows` rows in order; every count
    but the last a multiple of `align` (rows that must stay together, e.g. one attention head's)."""
    step = max(align, PIECE_BYTES // max(1, row_bytes) // align * align)
    return [(r, min(step, n_rows - r)) for r in range(0, n_rows, step)]


def new_writer(path: Path, arch: str, **kwargs) -> gguf.GGUFWriter:
    """gguf-py's GGUFWriter, packing long metadata arrays (the vocabulary) in one pass."""
    return _writer_class()(path, arch, **kwargs)


@lru_cache(maxsize=1)
def _writer_class() -> type:
    V = gguf.GGUFValueType

    class Writer(gguf.GGUFWriter):
        """gguf-py packs an array element by element through `_pack_val` (0.27 s of a 0.25B
        conversion for a 32k vocabulary, seconds for 150k); arrays of strings and numbers are
        packed here in one pass to the same bytes (compared with gguf-py's in the tests). Anything
        else, and any array gguf-py would refuse, goes to gguf-py's own code."""

        def _pack_val(self, val, vtype, add_vtype: bool, sub_type=None) -> bytes:
            if (vtype != V.ARRAY or self.endianess != gguf.GGUFEndian.LITTLE or isinstance(val, (bytes, str))
                    or not isinstance(val, (list, tuple)) or len(val) < 2):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            ltype = sub_type if sub_type is not None else V.get_type(val[0])
            fmt = self._simple_value_packing.get(ltype)
            # gguf-py types a value by its Python type alone, so one value of each type stands for all
            # of them (get_type per element was 0.1-0.2 s of a 32k vocabulary)
            if ltype == V.BOOL or (fmt is None and ltype != V.STRING) or (
                    sub_type is None and not all(V.get_type(i) is ltype for i in dict(zip(map(type, val), val)).values())):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            head = (struct.pack("<I", vtype) if add_vtype else b"") + struct.pack("<IQ", ltype, len(val))
            if ltype == V.STRING:
                parts = [head]
                for item in val:
                    enc = item.encode("utf-8") if isinstance(item, str) else item
                    parts += (struct.pack("<Q", len(enc)), enc)
                return b"".join(parts)
            return head + struct.pack(f"<{len(val)}{fmt}", *val)

    return Writer


def shard_paths(out: Path) -> list[Path]:
    """Existing split shards that belong to `out` (name-00001-of-0000N.gguf)."""
    return sorted(out.parent.glob(f"{out.stem}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].gguf"))


def write_header(w: gguf.GGUFWriter, infos: list[tuple[str, tuple[int, ...], Q]]) -> TensorData:
    """Announce every tensor (name, torch-order shape, type), write header, metadata and tensor
    infos, and return the writer of the tensor data that follows, tensor by tensor."""
    for name, shape, qtype in infos:
        wshape, dtype = writer_shape_dtype(shape, qtype)
        w.add_tensor_info(name, wshape, dtype, encoded_nbytes(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return TensorData(w)


class TensorData(FinishOrAbort):
    """Appends tensor data to the files whose headers `w` has written (one per split shard)."""

    def __init__(self, w: gguf.GGUFWriter):
        if w.endianess != (gguf.GGUFEndian.BIG if sys.byteorder == "big" else gguf.GGUFEndian.LITTLE):
            raise ValueError("TensorData writes native byte order only")
        assert w.fout is not None
        self._align = w.data_alignment
        self._infos = [list(t.values()) for t in w.tensors]  # per shard, in header order
        paths = [Path(f.name) for f in w.fout]
        w.close()  # gguf-py's buffered handles are done: the headers are rewritten below
        self._sinks: list[SequentialWriter] = []
        try:
            for p in paths:
                head = p.read_bytes()
                sink = SequentialWriter(p)
                self._sinks.append(sink)
                sink.write(head)
        except BaseException:
            self.abort()
            raise
        self._shard = 0
        self._next = 0
        self._left = sum(len(i) for i in self._infos)
        self._open: list | None = None  # [info, bytes written] of the tensor being written

    def write(self, data: np.ndarray) -> None:
        """The next tensor's bytes (native order, exactly the size its info announced)."""
        self.begin()
        ti = self._open[0]
        if int(data.nbytes) != ti.nbytes:
            self._open = None  # nothing of it written: the tensor can be given again
            raise ValueError(f"tensor data of {data.nbytes} bytes where the header announced {ti.nbytes}")
        self.piece(data, last=True)

    def begin(self) -> None:
        """Start the next tensor; its bytes follow in `piece`s, in order, then `end`."""
        if self._open is not None:
            raise ValueError("begin() while a tensor is still open")
        while self._shard < len(self._infos) and self._next == len(self._infos[self._shard]):
            self._shard, self._next = self._shard + 1, 0
        if self._shard == len(self._infos):
            raise ValueError("more tensors written than the header announced")
        self._open = [self._infos[self._shard][self._next], 0]
        self._pad(self._sinks[self._shard])

    def piece(self, data: np.ndarray, *, first: bool = False, last: bool = False) -> None:
        """The next bytes of the open tensor; `first`: they begin the next tensor, `last`: they end it."""
        if first:
            self.begin()
        if self._open is None:
            raise ValueError("piece() without begin()")
        ti = self._open[0]
        self._open[1] += int(data.nbytes)
        if self._open[1] > ti.nbytes:
            raise ValueError(f"tensor data of {self._open[1]}+ bytes where the header announced {ti.nbytes}")
        self._sinks[self._shard].write(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        if last:
            self.end()

    def end(self) -> None:
        """Finish the open tensor (all its announced bytes must have been written)."""
        ti, done = self._open
        if done != ti.nbytes:
            raise ValueError(f"tensor data of {done} bytes where the header announced {ti.nbytes}")
        self._pad(self._sinks[self._shard])
        self._open = None
        self._next += 1
        self._left -= 1

    def _pad(self, sink: SequentialWriter) -> None:
        n = -sink.position % self._align
        if n:
            sink.write(bytes(n))

    def close(self) -> None:
        """Finish every file (all announced tensors must have been written)."""
        if self._left:
            self.abort()
            raise ValueError(f"{self._left} announced tensor(s) were not written")
        for s in self._sinks:
            s.close()

    def abort(self) -> None:
        """Stop after an error (the caller's output transaction removes the files)."""
        for s in self._sinks:
            s.abort()


def commit_gguf(staging: Path, out: Path, old_shards: list[Path], force: bool) -> list[Path]:
    """Move the finished file(s) from staging beside `out`, replacing the old ones with force."""
    return commit_files(sorted(staging.glob("*.gguf")), out.parent, replace=[out, *old_shards] if force else [])


def type_counts(qtypes) -> dict[str, int]:
    counts: dict[str, int] = {}
    for q in qtypes:
        counts[q.name] = counts.get(q.name, 0) + 1
    return counts


def progress_bar(total: int, enabled: bool, desc: str = "writing GGUF"):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False)
