"""The one checkpoint reader and the one HF safetensors writer.

Reading is lazy: the index knows every tensor's name, shape, dtype, file and byte span
from the headers alone, and `load(name)` reads one tensor when it is needed.

Why safetensors data is read with readinto() and not through `safetensors.safe_open`:
safe_open maps the whole file, and mapped pages stay in the process's RSS while the
handle is open (measured: a 400 MB shard grew RSS by 400 MB); even reopening per tensor
keeps the mapped pages *and* the copy resident during each read. Reading the tensor's byte
span straight into its destination tensor keeps peak memory at one tensor, at the same
speed. The header format is the published safetensors layout (8-byte length + JSON).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from .errors import MtoolError
from .outputs import check_free_space, check_output_path, commit_dir, staging_dir

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = -1  # absolute byte offset of the data in a safetensors file; -1 for .bin

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MtoolError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise MtoolError(f"{path} is not valid JSON: {e}") from None


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (entries, data start offset)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise MtoolError(f"{path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise MtoolError(f"{path} is truncated or not a safetensors file (header claims {n} bytes)")
        try:
            header = json.loads(fh.read(n))
        except json.JSONDecodeError:
            raise MtoolError(f"{path} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise MtoolError(f"{path} is truncated: header describes {8 + n + end} bytes, file has {size}")
    return header, 8 + n


class CheckpointReader:
    """Lazy reader for an HF model directory (sharded or single safetensors, or legacy .bin)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MtoolError(f"{self.path} is not a model directory")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise MtoolError(f"{self.path} has no config.json; is it a Hugging Face model directory?")
        self.config: dict = _read_json(cfg)
        self._index: dict[str, TensorInfo] = {}
        self._bin_cache: dict[Path, Mapping[str, torch.Tensor]] = {}
        self._build_index()

    # -- index -----------------------------------------------------------------
    def _build_index(self) -> None:
        st_index = self.path / "model.safetensors.index.json"
        bin_index = self.path / "pytorch_model.bin.index.json"
        if st_index.is_file():
            files = sorted({self.path / f for f in _read_json(st_index).get("weight_map", {}).values()})
            self._index_safetensors(files, declared=_read_json(st_index)["weight_map"])
        elif sorted(self.path.glob("*.safetensors")):
            self._index_safetensors(sorted(self.path.glob("*.safetensors")))
        elif bin_index.is_file():
            files = sorted({self.path / f for f in _read_json(bin_index).get("weight_map", {}).values()})
            self._index_bin(files)
        elif sorted(self.path.glob("pytorch_model*.bin")):
            self._index_bin(sorted(self.path.glob("pytorch_model*.bin")))
        else:
            raise MtoolError(f"{self.path} holds no *.safetensors or pytorch_model*.bin weights")
        if not self._index:
            raise MtoolError(f"{self.path}: the weight files hold no tensors")

    def _index_safetensors(self, files: list[Path], declared: Mapping[str, str] | None = None) -> None:
        for f in files:
            if not f.is_file():
                raise MtoolError(f"shard {f} named in the index is missing")
            header, base = _safetensors_header(f)
            for name, meta in header.items():
                dtype = _ST_DTYPES.get(meta["dtype"])
                if dtype is None:
                    raise MtoolError(f"{f}: tensor {name} has unsupported dtype {meta['dtype']}")
                info = TensorInfo(name, tuple(meta["shape"]), dtype, f, base + meta["data_offsets"][0])
                if meta["data_offsets"][1] - meta["data_offsets"][0] != info.nbytes:
                    raise MtoolError(f"{f}: tensor {name} has {meta['data_offsets'][1] - meta['data_offsets'][0]} bytes of data, "
                                     f"its shape and dtype need {info.nbytes}")
                self._index[name] = info
        if declared:
            missing = [n for n in declared if n not in self._index]
            if missing:
                raise MtoolError(f"tensor {missing[0]} is listed in the index but absent from {declared[missing[0]]}")

    def _index_bin(self, files: list[Path]) -> None:
        for f in files:
            if not f.is_file():
                raise MtoolError(f"shard {f} named in the index is missing")
            sd = self._load_bin(f)
            for name, t in sd.items():
                self._index[name] = TensorInfo(name, tuple(t.shape), t.dtype, f)

    def _load_bin(self, f: Path) -> Mapping[str, torch.Tensor]:
        if f not in self._bin_cache:
            try:
                # mmap keeps the data on disk until a tensor is touched; weights_only refuses pickled code
                self._bin_cache[f] = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises many types for corrupt archives
                raise MtoolError(f"cannot read {f}: {str(e).splitlines()[0]}") from None
        return self._bin_cache[f]

    # -- access ----------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def info(self, name: str) -> TensorInfo:
        try:
            return self._index[name]
        except KeyError:
            raise MtoolError(f"tensor {name} not found in {self.path}") from None

    def load(self, name: str) -> torch.Tensor:
        """Read one tensor (a private copy, safe to keep after the call)."""
        info = self.info(name)
        if info.offset < 0:
            return self._load_bin(info.file)[name].clone()
        t = torch.empty(info.shape, dtype=info.dtype)
        buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else bytearray()
        with open(info.file, "rb", buffering=0) as fh:
            fh.seek(info.offset)
            got = fh.readinto(buf) if info.nbytes else 0
        if got != info.nbytes:
            raise MtoolError(f"cannot read {name} from {info.file}: file ended after {got} of {info.nbytes} bytes")
        return t

    def load_rows(self, name: str, start: int, count: int) -> torch.Tensor:
        """Rows [start, start+count) of a tensor viewed as 2-D (leading dims flattened):
        one expert of a fused [E, rows, cols] tensor, without reading the others."""
        info = self.info(name)
        row_shape = info.shape[-1:]
        n_rows = info.nbytes // max(1, info.dtype.itemsize * info.shape[-1])
        if start < 0 or start + count > n_rows:
            raise MtoolError(f"rows {start}..{start + count} are outside {name} ({n_rows} rows)")
        if info.offset < 0:
            return self._load_bin(info.file)[name].reshape(-1, *row_shape)[start : start + count].clone()
        t = torch.empty((count, *row_shape), dtype=info.dtype)
        row_bytes = info.shape[-1] * info.dtype.itemsize
        with open(info.file, "rb", buffering=0) as fh:
            fh.seek(info.offset + start * row_bytes)
            got = fh.readinto(t.view(-1).view(torch.uint8).numpy())
        if got != count * row_bytes:
            raise MtoolError(f"cannot read {name} from {info.file}: file ended early")
        return t

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._index.values())

    def iter_infos(self) -> Iterator[TensorInfo]:
        return iter(self._index.values())


# -- writer ----------------------------------------------------------------------

TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)


def parse_size(text: str | int | None) -> int:
    """'5G', '500M', '2000000' -> bytes (decimal units, as llama.cpp's gguf-split uses)."""
    if text is None or text == "" or text == 0:
        return 0
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B")
    units = {"K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise MtoolError(f"cannot parse size {text!r}; use e.g. 500M or 5G") from None


_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class TensorSource(Protocol):
    """What the writer needs of a tensor: canonical LazyTensors satisfy it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    def load(self) -> torch.Tensor: ...


def _nbytes(t: TensorSource) -> int:
    n = t.dtype.itemsize
    for d in t.shape:
        n *= d
    return n


def write_safetensors_stream(path: Path, tensors: list[TensorSource], on_tensor: Callable[[int], None] | None = None,
                             metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file tensor by tensor.

    Hand-written because `safetensors.save_file` needs every tensor of a shard in memory
    at once; here shapes and dtypes are known up front, so the header (the published
    layout: 8-byte little-endian length, JSON, padded to 8 bytes) is written first and the
    data streams after it. Files are read back by the safetensors library in the tests.
    """
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for t in tensors:
        n = _nbytes(t)
        header[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh, ThreadPoolExecutor(max_workers=1) as pool:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        # the next tensor is read (or computed: merges, transforms) while this one is written
        pending = pool.submit(tensors[0].load) if tensors else None
        for i, t in enumerate(tensors):
            data = pending.result()
            pending = pool.submit(tensors[i + 1].load) if i + 1 < len(tensors) else None
            if tuple(data.shape) != tuple(t.shape) or data.dtype != t.dtype:
                raise MtoolError(f"tensor {t.name}: produced {list(data.shape)} {data.dtype}, planned {list(t.shape)} {t.dtype}")
            if data.numel():
                fh.write(data.contiguous().view(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
            if on_tensor:
                on_tensor(_nbytes(t))
            del data


def write_hf_checkpoint(
    out: Path,
    config: dict,
    tensors: list[TensorSource],
    *,
    max_shard_bytes: int = 5 * 1000**3,
    copy_from: Path | None = None,
    tokenizer_config: dict | None = None,
    generation_config: dict | None = None,
    force: bool = False,
    sources: tuple[Path, ...] = (),
    progress: bool = False,
    extra_files: dict[str, bytes] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write an HF model directory: sharded safetensors + index, config, tokenizer files.

    Tensors stream one at a time (memory: one tensor); the directory appears under `out`
    only once complete. `tokenizer_config` / `generation_config` replace the copied files.
    """
    import shutil

    out = Path(out)
    check_output_path(out, force=force, sources=sources)
    total = sum(_nbytes(t) for t in tensors)
    check_free_space(out.parent, total)
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += _nbytes(t)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing safetensors", leave=False)
    with staging_dir(out) as tmp:
        for fname, shard in zip(names, shards):
            write_safetensors_stream(tmp / fname, shard, bar.update if bar else None, metadata)
        if bar:
            bar.close()
        if n > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {t.name: fname for fname, shard in zip(names, shards) for t in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        if copy_from is not None:
            for fname in TOKENIZER_FILES:
                if (Path(copy_from) / fname).is_file():
                    shutil.copy2(Path(copy_from) / fname, tmp / fname)
        if tokenizer_config is not None:
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        if generation_config is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
        return commit_dir(tmp, out, force=force)
