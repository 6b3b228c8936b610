"""GGUF output types: which GGML type each tensor gets, and how a torch tensor is encoded.

Quantization itself is gguf-py's (`gguf.quants`), except Q8_0, the most used type, which
is written here with torch ops (multi-threaded; gguf-py's numpy version is single-threaded
and was the bottleneck). It follows gguf-py's Q8_0 arithmetic step for step (f32 amax/127,
round half away from zero, f16 scale), and a test checks it is byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import gguf
import numpy as np
import torch

from ..ggml import ggml
from ..numerics import CHUNK_ELEMENTS
from .quant_policy import FLOAT_TYPES, KQUANTS

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


def writer_shape_dtype(shape: tuple[int, ...], qtype: Q) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) to announce to GGUFWriter.add_tensor_info for this type."""
    if qtype == Q.F32:
        return shape, np.dtype(np.float32)
    if qtype == Q.F16:
        return shape, np.dtype(np.float16)
    if qtype == Q.BF16:
        return shape, np.dtype(np.uint16)
    return gguf.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8)




def _q8_0_torch(t: torch.Tensor) -> np.ndarray:
    blocks = t.to(torch.float32).reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    x = blocks * inv
    # np_roundf (half away from zero): add +-0.5, then the int8 cast truncates toward zero
    qs = (x + torch.copysign(torch.tensor(0.5), x)).to(torch.int8)
    return torch.cat([d.to(torch.float16).view(torch.uint8), qs.view(torch.uint8)], dim=1).numpy()


def _encode_rows(t: torch.Tensor, qtype: Q) -> np.ndarray:
    if qtype == Q.Q8_0:
        return _q8_0_torch(t)
    return gguf.quants.quantize(t.to(torch.float32).numpy(), qtype)


def encode(t: torch.Tensor, qtype: Q, *, libggml: bool = False, name: str = "tensor",
           imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode a float tensor as `qtype`; returns the bytes GGUF stores (as a numpy array).

    With `libggml` every quantized type is made by libggml's own kernels (the K-/I-quant files,
    whose fallback types must match llama-quantize byte for byte too); `imatrix` then holds one
    importance per column."""
    t = t.contiguous()
    if libggml and qtype not in FLOAT_TYPES:
        rows = t.to(torch.float32).reshape(-1, t.shape[-1]).numpy()
        out = ggml().quantize(rows, int(qtype), imatrix, name=name)
        return out.reshape(gguf.quant_shape_to_byte_shape(tuple(t.shape), qtype))
    if qtype == Q.F32:
        return t.to(torch.float32).numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    if qtype == Q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    rows = t.reshape(-1, t.shape[-1])
    out = np.empty(gguf.quant_shape_to_byte_shape(tuple(rows.shape), qtype), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    for r in range(0, rows.shape[0], step):
        out[r : r + step] = _encode_rows(rows[r : r + step], qtype).reshape(-1, out.shape[1])
    return out.reshape(gguf.quant_shape_to_byte_shape(tuple(t.shape), qtype))
