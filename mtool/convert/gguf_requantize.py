"""`mtool quantize`: re-quantize an f32/f16/bf16 GGUF (single or split) the way llama-quantize does.

All metadata and the vocabulary are copied; `general.file_type` and the quantization version are
set; each tensor gets the type llama.cpp's policy chooses (quant_policy.py) and libggml's bytes
(mtool.ggml), so the result equals `llama_model_quantize`'s and mtool's one-pass file. Quantized
inputs are refused: re-quantizing quantized weights silently compounds the error. Tensors are
read with pread in row pieces; memory stays at a few pieces, whatever the tensor. No torch:
values go from the file's storage through libggml's converters and quantizers.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..buffers import Recycler
from ..dtypes import DType
from ..errors import InputError, UsageError
from ..gguf_file import open_gguf
from ..numerics import scan_storage
from ..outputs import check_output_path, output_transaction
from .gguf_write import (GGUFResult, commit_gguf, new_writer, progress_bar, row_pieces, shard_paths, type_counts,
                         write_header)
from .gguf_types import FLOAT_DTYPES, Queued, encoded_nbytes, submit_encode
from .imatrix_file import add_imatrix_metadata, importances_for
from .quant_policy import FLOAT_TYPES, KQUANTS, MixtureOptions, plan_mixture

Q = gguf.GGMLQuantizationType
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
# keys the writer sets itself, or that describe the input's encoding or splitting
_SKIP = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version", "split.")


def input_shards(path: Path) -> list[Path]:
    """All shards of a split GGUF given its first (or any) shard; [path] otherwise."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    shards = [path.parent / f"{m['stem']}-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise InputError(f"shard {missing[0]} of the split GGUF {path} is missing")
    return shards


@dataclass
class _Piece:
    """Rows [start, start+count) of one expert (`expert`; 0 for a 2-D tensor) of a tensor, read alone."""

    fd: int
    tensor: gguf.ReaderTensor
    qtype: Q
    expert: int
    start: int
    count: int
    offset: int  # file offset of its first byte
    nbytes: int  # bytes read
    out_nbytes: int  # bytes written
    imp: np.ndarray | None
    first: bool = False
    last: bool = False


def _pieces(fd: int, t: gguf.ReaderTensor, shape: tuple[int, ...], qtype: Q,
            imp: np.ndarray | None) -> list[_Piece]:
    """One tensor in pieces of about PIECE_BYTES of its rows, expert by expert; each expert of a 3-D
    tensor with importances gets its own slice of them (as llama-quantize quantizes it)."""
    cols = shape[-1]
    experts = shape[0] if len(shape) == 3 else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) // experts if len(shape) > 1 else 1
    row_bytes = int(t.n_bytes) // max(1, rows * experts)
    out = []
    for e in range(experts):
        sl = imp[e * cols : (e + 1) * cols] if imp is not None and experts > 1 else imp
        for start, count in row_pieces(rows, row_bytes) or [(0, 0)]:  # an empty tensor: one empty piece
            out.append(_Piece(fd, t, qtype, e, start, count, int(t.data_offset) + (e * rows + start) * row_bytes,
                              count * row_bytes, encoded_nbytes((count, cols), qtype), sl))
    out[0].first = out[-1].last = True
    return out


def _load(p: _Piece, src: Path, take) -> tuple[np.ndarray, DType | None]:
    """A piece's bytes (kept as they are when its tensor's type stays: dtype None), or its values as
    numpy storage of its float type, checked for NaN/Inf. Read into `take(nbytes)`."""
    t = p.tensor
    buf = take(p.nbytes)
    if os.preadv(p.fd, [buf], p.offset) != buf.nbytes:
        raise InputError(f"{src} is truncated: tensor {t.name} ends past the end of the file")
    if p.qtype == t.tensor_type:
        return buf, None  # norms, router: copied as they are
    dtype = FLOAT_DTYPES[t.tensor_type]
    a = buf.view(dtype.np_storage)
    if not scan_storage(a, dtype)[0]:
        raise InputError(f"tensor {t.name} of {src} contains NaN or Inf values")
    return a.reshape(p.count, -1), dtype


def requantize_gguf(src: Path, out: Path, outtype: str, *, split_max_size: int = 0, force: bool = False,
                    progress: bool = True, mixture: MixtureOptions | None = None) -> GGUFResult:
    """Write `src` (f32/f16/bf16 GGUF) re-quantized as K-/I-quant mixture `outtype` at `out`."""
    src, out = Path(src), Path(out)
    if outtype not in KQUANTS:
        raise UsageError(f"--outtype {outtype} is not a K-/I-quant mixture (choose from {', '.join(KQUANTS)})")
    kq = KQUANTS[outtype]
    mixture = mixture or MixtureOptions()
    if out.suffix != ".gguf":
        raise UsageError(f"GGUF output {out} must end in .gguf")
    shards = input_shards(src)
    old_shards = shard_paths(out)
    check_output_path(out, force=force, sources=shards, related=old_shards)
    readers = [open_gguf(s) for s in shards]
    first = readers[0]
    arch_field = first.fields.get("general.architecture")
    if arch_field is None:
        raise InputError(f"{src} has no general.architecture")
    arch = arch_field.contents()
    tensors = [t for r in readers for t in r.tensors]
    quantized = [t for t in tensors if t.tensor_type not in FLOAT_TYPES]
    if quantized:
        raise InputError(f"{src} holds quantized tensors ({quantized[0].name} is {quantized[0].tensor_type.name}); "
                         f"re-quantizing quantized weights compounds their error: give an f32/f16/bf16 GGUF")

    def hp(key: str, default: int = 0) -> int:
        f = first.fields.get(f"{arch}.{key}")
        return int(f.contents()) if f is not None else default

    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in tensors}  # torch order: ne0 last
    plan = plan_mixture(shapes, kq, mixture, n_head=hp("attention.head_count"),
                        n_head_kv=hp("attention.head_count_kv", hp("attention.head_count")),
                        n_expert=hp("expert_count"), n_layer=hp("block_count"))
    imps, im_notes = importances_for(mixture.imatrix, {n: (shapes[n], q) for n, q in plan.types.items()}, outtype)
    total = sum(encoded_nbytes(shapes[t.name], plan.types[t.name]) for t in tensors)
    meta_bytes = sum(int(f.parts[-1].nbytes) + 64 for f in first.fields.values()) if first.fields else 0
    t0 = time.perf_counter()
    with output_transaction(out, force=force, sources=shards, related=old_shards,
                            needed_bytes=total + meta_bytes + 96 * len(tensors)) as tx:
        w = new_writer(tx.dir / out.name, arch, split_max_size=split_max_size)
        for key, field in first.fields.items():
            if key.startswith(_SKIP) or not field.types:
                continue
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub)
        w.add_file_type(kq.file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if mixture.imatrix is not None:
            add_imatrix_metadata(w, mixture.imatrix)
        tensor_data = write_header(w, [(t.name, shapes[t.name], plan.types[t.name]) for t in tensors])
        bar = progress_bar(total, progress, "quantizing")
        # Tensors are read in row pieces (gguf_write.PIECE_BYTES) with pread (not through the reader's
        # memory map, whose touched pages would stay resident: RSS would grow with the file) one piece
        # ahead of the quantizer, and each piece's quantization is queued before the previous one is
        # waited for and written, so the quantizer threads never idle between pieces and memory is a
        # few pieces whatever the tensor. Input and output buffers are recycled (buffers.Recycler):
        # fresh ones cost page zeroing per piece.
        fds = {s: os.open(s, os.O_RDONLY) for s in shards}
        inputs, outputs = Recycler(keep=3), Recycler(keep=2)
        try:
            with tensor_data, ThreadPoolExecutor(max_workers=1) as reader:
                items = [p for shard, r in zip(shards, readers) for t in r.tensors
                         for p in _pieces(fds[shard], t, shapes[t.name], plan.types[t.name], imps.get(t.name))]
                nxt = reader.submit(_load, items[0], src, inputs.take) if items else None
                # (piece, input buffer, queued encoding): the newest piece, and the one before it,
                # which is waited for and written while the newest is being quantized
                queued = prev = None

                def finish(p: _Piece, raw, job) -> None:
                    data = job.result()
                    tensor_data.piece(data, first=p.first, last=p.last)
                    if data is not raw:
                        outputs.give(data)
                    inputs.give(raw)
                    if bar:
                        bar.update(p.out_nbytes)

                try:
                    for k, p in enumerate(items):
                        raw, dtype = nxt.result()
                        nxt = reader.submit(_load, items[k + 1], src, inputs.take) if k + 1 < len(items) else None
                        job = Queued(raw) if dtype is None else submit_encode(
                            raw, dtype, p.qtype, name=p.tensor.name, imatrix=p.imp, alloc=outputs.take)
                        prev, queued = queued, (p, raw, job)
                        del raw, job
                        if prev is not None:
                            finish(*prev)
                            prev = None
                    if queued is not None:
                        finish(*queued)
                        queued = None
                except BaseException:  # an error or an interrupt: what is still queued is not quantized
                    for q in (prev, queued):
                        if q is not None:
                            q[2].cancel()
                    raise
        finally:
            for fd in fds.values():
                os.close(fd)
        if bar:
            bar.close()
        files = commit_gguf(tx.dir, out, old_shards, force)
    counts = type_counts(plan.types.values())
    return GGUFResult(files=files, n_tensors=len(tensors), bytes_out=total,
                      seconds=time.perf_counter() - t0, type_counts=counts, notes=im_notes,
                      n_params=sum(int(t.n_elements) for t in tensors), fallbacks=plan.fallbacks)
