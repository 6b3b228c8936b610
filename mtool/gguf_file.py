"""Reading GGUF files: one validated opener for inspect, verify and the tests' readers.

gguf-py's GGUFReader raises assorted errors (ValueError, IndexError, struct errors) on files
that are not GGUF or were cut short; here every such file is one InputError naming it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .errors import InputError

GGUF_MAGIC = b"GGUF"


@lru_cache(maxsize=1)
def _reader_class():
    """gguf-py's GGUFReader with arrays of strings and scalars parsed in one pass.

    Written here because GGUFReader builds every array element through a memmap view (two per
    string, ~35 us each: 2.3 s for the tokens, scores and types of a 32k vocabulary, ~9 s at 128k),
    which every command that opens a GGUF paid. The fields are the ones gguf-py builds (one part per
    element, the same dtypes, data indices and types: tests/test_units.py compares them), so gguf-py's
    own `contents()` and every consumer work unchanged. Nested arrays and byte-swapped files take
    gguf-py's own path."""
    import gguf
    import numpy as np

    array, string = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING

    class Reader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if raw_type != array or self.byte_order != "I":
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            sub = gguf.GGUFValueType(int(raw_itype[0]))
            nptype = self.gguf_scalar_to_np.get(sub)
            if sub != string and nptype is None:
                return super()._get_field_parts(orig_offs, raw_type)
            alen = self._get(orig_offs + 4, np.uint64)
            n, offs = int(alen[0]), orig_offs + 12
            base = np.asarray(self.data)  # a plain ndarray over the map: slicing it is cheap
            parts: list = [raw_itype, alen]
            if sub == string:
                raw = memoryview(base)
                for _ in range(n):
                    length = int.from_bytes(raw[offs : offs + 8], "little")
                    parts.append(base[offs : offs + 8].view(np.uint64))
                    parts.append(base[offs + 8 : offs + 8 + length])
                    offs += 8 + length
                idxs = list(range(3, 2 + 2 * n, 2))
            else:
                size = np.dtype(nptype).itemsize
                values = base[offs : offs + n * size].view(nptype)
                parts += [values[i : i + 1] for i in range(n)]
                offs += n * size
                idxs = list(range(2, 2 + n))
            return offs - orig_offs, parts, idxs, [array, sub] if n else [array]

    return Reader


def is_gguf(path: Path) -> bool:
    """A .gguf file (by name; `open_gguf` checks the content)."""
    return Path(path).is_file() and Path(path).suffix == ".gguf"


def open_gguf(path: Path):
    """A gguf.GGUFReader (mtool's faster subclass) over `path`, after checking magic, header and
    that no tensor lies beyond the end of the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = _reader_class()(str(path))
    except Exception as e:  # noqa: BLE001 - gguf-py raises many types for damaged files
        raise InputError(f"{path} is damaged or truncated ({type(e).__name__}: {str(e)[:120]})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise InputError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    return reader


def gguf_metadata(path: Path, reader=None) -> dict:
    """Scalar metadata of a GGUF file (arrays such as the vocab are summarized by length)."""
    import gguf

    reader = reader or open_gguf(path)
    meta: dict = {}
    for key, f in reader.fields.items():
        if not f.types:
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            meta[key] = f"[{len(f.data)} items]"
        elif f.types[0] == gguf.GGUFValueType.STRING:
            meta[key] = bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
        else:
            meta[key] = f.parts[f.data[0]].tolist()[0]
    return meta
