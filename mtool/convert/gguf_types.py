"""GGUF output types: which GGML type each tensor gets, and how a tensor's values are encoded.

Every encoding is libggml's (mtool.ggml): its float converters and `ggml_quantize_chunk`,
the code llama.cpp itself runs, over numpy storage a chunk of rows at a time (float32
scratch stays a few MB whatever the tensor). The legacy types' bytes are the same as
gguf-py's (`gguf.quants`, which llama.cpp's converter uses for Q8_0): the tests compare them.
No torch here: the float and q8_0 conversions run without importing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod

import gguf
import numpy as np

from ..dtypes import BF16, F16, F32, DType
from ..ggml import ggml
from .quant_policy import KQUANTS

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@dataclass(frozen=True)
class OutType:
    """One `--outtype`: the main tensor type, the file type tag, and an output.weight override.

    `mixture` types (the K- and I-quants) take each tensor's type from llama.cpp's policy
    (quant_policy.py) and are quantized by libggml itself (mtool.ggml)."""

    name: str
    qtype: Q
    file_type: FT
    output_qtype: Q | None = None  # lm_head is the most sensitive matrix: keep it wider at 4/5 bits
    mixture: bool = False


OUTTYPES: dict[str, OutType] = {
    o.name: o
    for o in (
        OutType("f32", Q.F32, FT.ALL_F32),
        OutType("f16", Q.F16, FT.MOSTLY_F16),
        OutType("bf16", Q.BF16, FT.MOSTLY_BF16),
        OutType("q8_0", Q.Q8_0, FT.MOSTLY_Q8_0),
        OutType("q5_1", Q.Q5_1, FT.MOSTLY_Q5_1, output_qtype=Q.Q8_0),
        OutType("q5_0", Q.Q5_0, FT.MOSTLY_Q5_0, output_qtype=Q.Q8_0),
        OutType("q4_1", Q.Q4_1, FT.MOSTLY_Q4_1, output_qtype=Q.Q8_0),
        OutType("q4_0", Q.Q4_0, FT.MOSTLY_Q4_0, output_qtype=Q.Q8_0),
        *(OutType(k.name, k.default, k.file_type, mixture=True) for k in KQUANTS.values()),
    )
}

# GGUF tensors that always stay F32, whatever the outtype (besides every 1-D tensor).
ALWAYS_F32_SUFFIXES = (".ffn_gate_inp.weight",)  # MoE router: tiny and routing-critical

# Fallback when a row does not fill whole quant blocks (as llama.cpp's converter does).
ROW_FALLBACK = Q.F16


def choose_qtype(gguf_name: str, shape: tuple[int, ...], outtype: OutType, *, tied: bool = False) -> tuple[Q, str | None]:
    """GGML type for one tensor, and a note when it differs from the outtype for a reason.

    With tied embeddings llama.cpp uses token_embd as the output matrix, so it gets the
    output type (as llama-quantize does when a model has no output.weight).
    """
    if len(shape) == 1 or gguf_name.endswith(ALWAYS_F32_SUFFIXES):
        return Q.F32, None
    is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    qtype = outtype.output_qtype if (is_output and outtype.output_qtype) else outtype.qtype
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return ROW_FALLBACK, f"{gguf_name}: row length {shape[-1]} is not a multiple of {block}, written as {ROW_FALLBACK.name}"
    return qtype, None


def encoded_nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return prod(shape) // block * type_size


# the GGUF float types and the element type whose numpy storage they hold
FLOAT_DTYPES: dict[Q, DType] = {Q.F32: F32, Q.F16: F16, Q.BF16: BF16}


def writer_shape_dtype(shape: tuple[int, ...], qtype: Q) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) to announce to GGUFWriter.add_tensor_info for this type."""
    if qtype in FLOAT_DTYPES:
        return shape, FLOAT_DTYPES[qtype].np_storage
    return gguf.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8)


class Queued:
    """A tensor's GGUF bytes `out`, being written by queued `parts` (each with `.result()` and
    `.cancel()`: libggml's pending jobs, or other Queued); none when they are already there."""

    def __init__(self, out: np.ndarray, parts: list | tuple = ()):
        self._out, self._parts = out, parts

    def result(self) -> np.ndarray:
        """Wait for every part (also when one failed: none may still write into `out` afterwards)."""
        errors = []
        for p in self._parts:
            try:
                p.result()
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        if errors:
            raise errors[0]
        return self._out

    def cancel(self) -> None:
        """Drop the work not started yet (an interrupted or failed run)."""
        for p in self._parts:
            p.cancel()


def encode(a: np.ndarray, dtype: DType, qtype: Q, *, name: str = "tensor", imatrix: np.ndarray | None = None,
           alloc: Callable[[int], np.ndarray] | None = None) -> np.ndarray:
    """Encode `a` (numpy storage of an f32/f16/bf16 tensor, see mtool.dtypes) as `qtype`;
    returns the bytes GGUF stores (`a` itself where no conversion is needed). `imatrix`: one
    importance per column (quantized types). `alloc(nbytes)`: where the output goes (a uint8
    buffer of exactly that many bytes), when one is needed; a fresh array otherwise."""
    return submit_encode(a, dtype, qtype, name=name, imatrix=imatrix, alloc=alloc).result()


def submit_encode(a: np.ndarray, dtype: DType, qtype: Q, *, name: str = "tensor", imatrix: np.ndarray | None = None,
                  alloc: Callable[[int], np.ndarray] | None = None) -> Queued:
    """`encode`, with a quantization queued on libggml's thread pool rather than waited for
    (`a` and the output must stay untouched until `.result()` has returned)."""
    a = np.ascontiguousarray(a)
    if qtype in FLOAT_DTYPES and FLOAT_DTYPES[qtype] == dtype:
        return Queued(a)
    g = ggml()
    nbytes = encoded_nbytes(tuple(a.shape), qtype)
    out = np.empty(nbytes, dtype=np.uint8) if alloc is None else alloc(nbytes)
    if out.dtype != np.uint8 or out.size != nbytes or not out.flags.c_contiguous:
        raise ValueError(f"encode: output buffer must be {nbytes} contiguous bytes")
    if qtype in FLOAT_DTYPES:
        dst = FLOAT_DTYPES[qtype]
        return Queued(g.convert(a, dtype.name, dst.name, out.view(dst.np_storage).reshape(a.shape)))
    n = int(a.shape[-1])
    rows = a.reshape(-1, n)
    res = out.reshape(rows.shape[0], g.row_size(int(qtype), n))
    pending = g.submit(rows, int(qtype), imatrix, src=dtype.name, name=name, out=res)
    return Queued(out.reshape(gguf.quant_shape_to_byte_shape(tuple(a.shape), qtype)), [pending])
