"""Tensor element types as the checkpoint layer knows them, without importing torch.

Why not torch.dtype: importing torch costs ~2 s on small machines, more than the rest of a
small GGUF conversion; the float and q8_0 conversions only move stored bytes through
libggml's converters, so the model layer names types with these objects and imports torch
only where a tensor is computed (`DType.torch`). A DType compares equal to the torch dtype
of the same name, so code holding torch dtypes keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class DType:
    """One element type: torch's name, the safetensors code, size, and the numpy type of its raw storage."""

    name: str  # torch's name: "bfloat16"
    code: str  # safetensors header code: "BF16"
    itemsize: int
    storage: str  # numpy dtype holding the stored bits ("uint16" for bfloat16, which numpy lacks)
    is_floating_point: bool

    @property
    def torch(self):
        """The torch.dtype (imports torch)."""
        import torch

        return getattr(torch, self.name)

    @property
    def np_storage(self) -> np.dtype:
        return np.dtype(self.storage)

    def __eq__(self, other) -> bool:
        if isinstance(other, DType):
            return self.name == other.name
        return type(other).__name__ == "dtype" and str(other) == f"torch.{self.name}"

    def __hash__(self) -> int:
        return hash(("dtype", self.name))

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DType({self.name})"


_ALL = (
    DType("float32", "F32", 4, "float32", True),
    DType("float16", "F16", 2, "float16", True),
    DType("bfloat16", "BF16", 2, "uint16", True),
    DType("float64", "F64", 8, "float64", True),
    DType("int64", "I64", 8, "int64", False),
    DType("int32", "I32", 4, "int32", False),
    DType("int16", "I16", 2, "int16", False),
    DType("int8", "I8", 1, "int8", False),
    DType("uint8", "U8", 1, "uint8", False),
    DType("bool", "BOOL", 1, "bool", False),
    DType("float8_e4m3fn", "F8_E4M3", 1, "uint8", True),
    DType("float8_e5m2", "F8_E5M2", 1, "uint8", True),
)
BY_CODE: dict[str, DType] = {d.code: d for d in _ALL}
BY_NAME: dict[str, DType] = {d.name: d for d in _ALL}
F32, F16, BF16 = BY_NAME["float32"], BY_NAME["float16"], BY_NAME["bfloat16"]
FLOATS = (F32, F16, BF16)  # what the converters accept


def as_dtype(x) -> DType:
    """A DType from a DType, a torch.dtype or a name ('bfloat16', 'torch.bfloat16')."""
    if isinstance(x, DType):
        return x
    name = str(x).removeprefix("torch.")
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown tensor dtype {x!r}") from None


def to_torch(a: np.ndarray, dtype: DType):
    """numpy storage -> torch tensor of `dtype`, sharing memory (imports torch)."""
    import torch

    t = torch.from_numpy(a)
    return t if t.dtype == dtype.torch else t.view(dtype.torch)


def to_storage(t, dtype: DType | None = None) -> np.ndarray:
    """torch tensor -> its numpy storage (bfloat16 as uint16 bits), sharing memory when contiguous."""
    dtype = as_dtype(t.dtype) if dtype is None else dtype
    t = t.contiguous()
    if dtype.np_storage.kind == "u" and dtype.is_floating_point:  # bfloat16, float8: numpy has no such type
        import torch

        t = t.view(torch.int16 if dtype.itemsize == 2 else torch.uint8)
    return t.numpy().view(dtype.np_storage)
