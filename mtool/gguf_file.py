"""Reading GGUF files: one validated opener for inspect, verify and the tests' readers.

gguf-py's GGUFReader raises assorted errors (ValueError, IndexError, struct errors) on files
that are not GGUF or were cut short; here every such file is one InputError naming it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """A .gguf file (by name; `open_gguf` checks the content)."""
    return Path(path).is_file() and Path(path).suffix == ".gguf"


def open_gguf(path: Path):
    """A gguf.GGUFReader over `path`, after checking magic, header and that no tensor lies
    beyond the end of the file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(f"{path} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
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
