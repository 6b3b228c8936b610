"""`mtool inspect`: a summary of an HF model directory or a GGUF file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .errors import MtoolError


def _fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def inspect_gguf(path: Path) -> dict:
    import gguf

    from .verify.runners import gguf_metadata

    reader = gguf.GGUFReader(str(path))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    meta = gguf_metadata(path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {
        "format": "gguf",
        "path": str(path),
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "file_type": meta.get("general.file_type"),
        "tensors (this file)": len(reader.tensors),
        "parameters (this file)": _fmt_params(n_params),
        "tensor types": dict(types),
        "vocab": len(tokens.data) if tokens else None,
        "split": f"{meta['split.no'] + 1} of {meta['split.count']}" if "split.count" in meta else "no",
        "size MB": round(path.stat().st_size / 1e6, 2),
        "metadata": {k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.") or not str(v).startswith("[")},
    }


def inspect_hf(path: Path) -> dict:
    from .checkpoint import CheckpointReader

    reader = CheckpointReader(path)
    cfg = reader.config
    infos = list(reader.iter_infos())
    dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in infos)
    files = sorted({i.file.name for i in infos})
    tok = "sentencepiece" if (path / "tokenizer.model").is_file() else "tokenizer.json" if (path / "tokenizer.json").is_file() else "none"
    n_params = 0
    for i in infos:
        n = 1
        for d in i.shape:
            n *= d
        n_params += n
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
            "num_local_experts", "num_experts_per_tok", "quantization_config")
    return {
        "format": "hf",
        "path": str(path),
        "architectures": cfg.get("architectures"),
        "parameters": _fmt_params(n_params),
        "tensors": len(infos),
        "dtypes": dict(dtypes),
        "weight files": len(files),
        "size MB": round(reader.total_bytes() / 1e6, 2),
        "tokenizer": tok,
        "config": {k: cfg[k] for k in keys if k in cfg},
    }


def inspect_path(path: str | Path) -> dict:
    """Summary dict of a GGUF file or an HF model directory."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return inspect_gguf(p)
    if p.is_dir():
        return inspect_hf(p)
    raise MtoolError(f"{p} is neither a .gguf file nor a model directory")


def render(summary: dict, indent: int = 0) -> str:
    """Aligned key: value lines, nested dicts indented."""
    lines = []
    width = max((len(k) for k in summary), default=0)
    for k, v in summary.items():
        if isinstance(v, dict) and v:
            lines.append(" " * indent + f"{k}:")
            lines.append(render(v, indent + 2))
        else:
            lines.append(" " * indent + f"{k:<{width}}  {v}")
    return "\n".join(lines)
