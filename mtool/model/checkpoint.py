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

import numpy as np

from ..direct_write import SequentialWriter
from ..dtypes import BY_CODE, FLOATS, DType, as_dtype, to_storage, to_torch
from ..errors import InputError, MtoolError, UsageError
from ..numerics import check_finite
from ..outputs import commit_dir, output_transaction

SUPPORTED_DTYPES = FLOATS


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives and what it is, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: DType
    file: Path
    offset: int = -1  # absolute byte offset of the data in a safetensors file; -1 for .bin

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def read_json(path: Path) -> dict:
    """A JSON object from `path`; InputError naming the file for anything else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


# safetensors' own limit on the header (the library refuses larger ones)
_MAX_HEADER = 100_000_000


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header as strictly as the safetensors library does;
    returns (entries, data start offset).

    Checked: header length and UTF-8 JSON object; every entry has a known dtype, a shape of
    non-negative ints and [begin, end] offsets; the spans, sorted, start at 0, touch without
    gap or overlap, each holds exactly dtype x shape bytes, and together they fill the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise InputError(f"{path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > _MAX_HEADER:
            raise InputError(f"{path} is truncated or not a safetensors file (header claims {n} bytes)")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{path} has a corrupt safetensors header (not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise InputError(f"{path} has a corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    spans = []
    for name, meta in header.items():
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= set(meta):
            raise InputError(f"{path}: header entry {name!r} lacks dtype, shape or data_offsets")
        shape, offs = meta["shape"], meta["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise InputError(f"{path}: tensor {name} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and o >= 0 for o in offs)
                and offs[0] <= offs[1]):
            raise InputError(f"{path}: tensor {name} has invalid data_offsets {offs!r}")
        if meta["dtype"] not in BY_CODE:
            raise InputError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}")
        need = BY_CODE[meta["dtype"]].itemsize
        for d in shape:
            need *= d
        if offs[1] - offs[0] != need:
            raise InputError(f"{path}: tensor {name} has {offs[1] - offs[0]} bytes of data, its shape and dtype need {need}")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise InputError(f"{path}: tensor {name}'s data {what} (corrupt safetensors header)")
        pos = end
    if 8 + n + pos > size:
        raise InputError(f"{path} is truncated: header describes {8 + n + pos} bytes, file has {size}")
    if 8 + n + pos != size:
        raise InputError(f"{path} has {size - 8 - n - pos} bytes after the last tensor (corrupt safetensors file)")
    return header, 8 + n


def _index_files(model_dir: Path, index_path: Path) -> tuple[list[Path], dict[str, str]]:
    """Shard files of an index.json, which must name files inside the model folder."""
    index = read_json(index_path)
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise InputError(f"{index_path} has no weight_map entries")
    root = model_dir.resolve()
    files = set()
    for tensor, fname in wm.items():
        if not isinstance(fname, str) or not fname:
            raise InputError(f"{index_path}: tensor {tensor} maps to {fname!r}, not a file name")
        f = (model_dir / fname).resolve()
        if f.parent != root and root not in f.parents:
            raise InputError(f"{index_path}: tensor {tensor} points outside the model folder ({fname})")
        files.add(model_dir / fname)
    return sorted(files), wm


class CheckpointReader:
    """Lazy reader for an HF model directory (sharded or single safetensors, or legacy .bin)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MtoolError(f"{self.path} is not a model directory")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise MtoolError(f"{self.path} has no config.json; is it a Hugging Face model directory?")
        self.config: dict = read_json(cfg)
        self._index: dict[str, TensorInfo] = {}
        self._bin_cache: dict[Path, Mapping] = {}  # path -> state dict of torch tensors
        self._build_index()

    # -- index -----------------------------------------------------------------
    def _build_index(self) -> None:
        st_index = self.path / "model.safetensors.index.json"
        bin_index = self.path / "pytorch_model.bin.index.json"
        if st_index.is_file():
            files, declared = _index_files(self.path, st_index)
            self._index_safetensors(files, declared=declared)
        elif sorted(self.path.glob("*.safetensors")):
            self._index_safetensors(sorted(self.path.glob("*.safetensors")))
        elif bin_index.is_file():
            self._index_bin(_index_files(self.path, bin_index)[0])
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
                if name in self._index:
                    raise InputError(f"tensor {name} is stored twice: in {self._index[name].file.name} and {f.name}")
                info = TensorInfo(name, tuple(meta["shape"]), BY_CODE[meta["dtype"]], f, base + meta["data_offsets"][0])
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
                self._index[name] = TensorInfo(name, tuple(t.shape), as_dtype(t.dtype), f)

    def _load_bin(self, f: Path) -> Mapping:
        if f not in self._bin_cache:
            import zipfile

            import torch

            # zip archives (torch >= 1.6) are mapped: data stays on disk until a tensor is touched.
            # Legacy (pre-1.6, non-zip) archives cannot be mapped and are read whole, one shard at
            # a time. weights_only=True either way: pickled code in a checkpoint is never run.
            legacy = not zipfile.is_zipfile(f)
            try:
                sd = torch.load(f, map_location="cpu", mmap=not legacy, weights_only=True)
            except Exception as e:  # torch raises many types for corrupt or code-carrying archives
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                if "weights_only" in str(e) or "Unsupported" in str(e) or "global" in str(e).lower():
                    raise InputError(
                        f"{f} holds more than plain tensors (pickled objects mtool will not execute); convert it "
                        f"to safetensors in a sandbox you trust, e.g. with transformers' save_pretrained("
                        f"safe_serialization=True)") from None
                raise InputError(f"cannot read {f}: {first}") from None
            if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
                raise InputError(f"{f} is not a state dict of tensors")
            self._bin_cache[f] = sd
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

    def load(self, name: str):
        """Read one tensor as a torch tensor (a private copy, safe to keep after the call)."""
        return to_torch(self.load_array(name), self.info(name).dtype)

    def load_array(self, name: str) -> np.ndarray:
        """Read one tensor's stored values as numpy (bfloat16 as its uint16 bits; see mtool.dtypes),
        without torch for safetensors files."""
        info = self.info(name)
        if info.offset < 0:
            return to_storage(self._load_bin(info.file)[name], info.dtype).copy()
        return self._read(info, info.shape, 0)

    def load_rows_array(self, name: str, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, start+count) of a tensor viewed as 2-D (leading dims flattened), as numpy
        storage: one expert of a fused [E, rows, cols] tensor, or a piece of a large tensor, without
        reading the rest. `out`: a contiguous uint8 buffer of exactly their size to read into
        (safetensors; a .bin file's rows come back in a new array)."""
        info = self.info(name)
        self._check_rows(info, start, count)
        if info.offset < 0:
            t = self._load_bin(info.file)[name].reshape(-1, *info.shape[-1:])[start : start + count]
            return to_storage(t, info.dtype).copy()
        return self._read(info, (count, *info.shape[-1:]), start * info.shape[-1] * info.dtype.itemsize, out)

    @staticmethod
    def _check_rows(info: TensorInfo, start: int, count: int) -> None:
        n_rows = info.nbytes // max(1, info.dtype.itemsize * info.shape[-1])
        if start < 0 or start + count > n_rows:
            raise MtoolError(f"rows {start}..{start + count} are outside {info.name} ({n_rows} rows)")

    @staticmethod
    def _read(info: TensorInfo, shape: tuple[int, ...], skip: int, buf: np.ndarray | None = None) -> np.ndarray:
        if buf is None:
            out = np.empty(shape, dtype=info.dtype.np_storage)
        else:
            n = int(np.prod(shape)) * info.dtype.itemsize
            if buf.dtype != np.uint8 or buf.size != n or not buf.flags.c_contiguous:
                raise ValueError(f"read buffer for {info.name} must be {n} contiguous bytes")
            out = buf.view(info.dtype.np_storage).reshape(shape)
        want = out.nbytes
        got = 0
        if want:
            with open(info.file, "rb", buffering=0) as fh:
                fh.seek(info.offset + skip)
                got = fh.readinto(out.reshape(-1).view(np.uint8))
        if got != want:
            raise MtoolError(f"cannot read {info.name} from {info.file}: file ended after {got} of {want} bytes")
        return out

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
        value = float(s[:-1]) * units[s[-1]] if s and s[-1] in units else float(s)
    except ValueError:
        raise UsageError(f"cannot parse size {text!r}; use e.g. 500M or 5G") from None
    if not value > 0 or value != value or value == float("inf"):
        raise UsageError(f"size {text!r} must be positive, e.g. 500M or 5G")
    return int(value)


class TensorSource(Protocol):
    """What the writer needs of a tensor: canonical LazyTensors satisfy it."""

    name: str
    shape: tuple[int, ...]
    dtype: DType  # or a torch.dtype

    def load(self): ...  # -> torch.Tensor


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
        header[t.name] = {"dtype": as_dtype(t.dtype).code, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with SequentialWriter(path) as fh, ThreadPoolExecutor(max_workers=1) as pool:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        # the next tensor is read (or computed: merges, transforms) while this one is written
        pending = pool.submit(tensors[0].load) if tensors else None
        for i, t in enumerate(tensors):
            data = pending.result()
            pending = pool.submit(tensors[i + 1].load) if i + 1 < len(tensors) else None
            if tuple(data.shape) != tuple(t.shape) or as_dtype(t.dtype) != data.dtype:
                raise MtoolError(f"tensor {t.name}: produced {list(data.shape)} {data.dtype}, planned {list(t.shape)} {t.dtype}")
            if data.is_floating_point():
                check_finite(data, t.name)
            if data.numel():
                fh.write(to_storage(data, as_dtype(t.dtype)))  # buffer protocol: no copy
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
    out = Path(out)
    if copy_from is not None:
        check_tokenizer_files(Path(copy_from))
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + _nbytes(t) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += _nbytes(t)
    total = sum(_nbytes(t) for t in tensors)
    small: dict[str, bytes] = {"config.json": json.dumps(config, indent=2, ensure_ascii=False).encode()}
    if copy_from is not None:
        for fname in TOKENIZER_FILES:
            if (Path(copy_from) / fname).is_file():
                small[fname] = (Path(copy_from) / fname).read_bytes()
    if tokenizer_config is not None:
        small["tokenizer_config.json"] = json.dumps(tokenizer_config, indent=2, ensure_ascii=False).encode()
    if generation_config is not None:
        small["generation_config.json"] = json.dumps(generation_config, indent=2).encode()
    small.update(extra_files or {})
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {t.name: fname for fname, shard in zip(names, shards) for t in shard}}
        small["model.safetensors.index.json"] = json.dumps(index, indent=2).encode()
    # every byte that will be written: tensors, safetensors headers (~100 B per tensor), small files
    needed = total + 256 * len(tensors) + sum(len(b) for b in small.values())
    with output_transaction(out, force=force, sources=sources, needed_bytes=needed) as tx:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing safetensors", leave=False)
        for fname, shard in zip(names, shards):
            write_safetensors_stream(tx.dir / fname, shard, bar.update if bar else None, metadata)
        if bar:
            bar.close()
        for fname, data in small.items():
            (tx.dir / fname).write_bytes(data)
        return commit_dir(tx.dir, out, force=force)


def check_tokenizer_files(tok_dir: Path) -> None:
    """Load every tokenizer file before it is copied into an output: a corrupt one is named
    now instead of shipping in an artifact that fails when a user loads it."""
    tok_dir = Path(tok_dir)
    sp = tok_dir / "tokenizer.model"
    if sp.is_file():
        import sentencepiece as spm

        try:
            proc = spm.SentencePieceProcessor(model_file=str(sp))
            ok = proc.vocab_size() > 0
        except Exception:  # sentencepiece raises RuntimeError/OSError/others for bad protos
            ok = False
        if not ok:
            raise InputError(f"{sp} is not a valid SentencePiece model")
    tj = tok_dir / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_str(tj.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises its own Exception type with a serde message
            raise InputError(f"{tj} is not a valid tokenizer.json: {str(e).splitlines()[0][:200]}") from None
    for fname in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                  "chat_template.json", "vocab.json"):
        if (tok_dir / fname).is_file():
            read_json(tok_dir / fname)
