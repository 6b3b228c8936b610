"""`mtool inspect`: a summary of an HF model directory or a GGUF file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .errors import MtoolError
from .gguf_file import gguf_metadata, open_gguf
from .model.checkpoint import CheckpointReader
from .model.families import ADAPTERS, load_canonical


def _fmt_params(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def inspect_gguf(path: Path) -> dict:
    import gguf

    reader = open_gguf(path)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    meta = gguf_metadata(path, reader)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    ft = meta.get("general.file_type")
    try:
        ft_name = gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").lower() if ft is not None else None
    except ValueError:
        ft_name = f"unknown ({ft})"
    return {
        "format": "gguf",
        "path": str(path),
        "architecture": meta.get("general.architecture"),
        "name": meta.get("general.name"),
        "file_type": ft_name,
        "tensors": len(reader.tensors),
        "parameters": n_params,
        "tensor_types": dict(types),
        "vocab_size": len(tokens.data) if tokens else None,
        "split": {"index": meta["split.no"] + 1, "count": meta["split.count"]} if "split.count" in meta else None,
        "size_mb": round(path.stat().st_size / 1e6, 2),
        "metadata": {k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.") or not str(v).startswith("[")},
    }


def inspect_hf(path: Path) -> dict:
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
    shown = {k: cfg[k] for k in keys if k in cfg}
    family = None
    if any(a in ADAPTERS for a in cfg.get("architectures") or []) and "quantization_config" not in cfg:
        # families with their own config names (TeleChat: n_layer, n_head...) are shown normalized
        model = load_canonical(path)
        family = model.family
        shown.update({k: model.config[k] for k in keys if k in model.config and model.config[k] is not None})
    return {
        "format": "hf",
        "path": str(path),
        "architectures": cfg.get("architectures"),
        "family": family,
        "parameters": n_params,
        "tensors": len(infos),
        "dtypes": dict(dtypes),
        "weight_files": len(files),
        "size_mb": round(reader.total_bytes() / 1e6, 2),
        "tokenizer": tok,
        "config": shown,
    }


def inspect_path(path: str | Path) -> dict:
    """Summary dict of a GGUF file or an HF model directory."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return inspect_gguf(p)
    if p.is_dir():
        return inspect_hf(p)
    if not p.exists():
        raise MtoolError(f"{p} not found")
    raise MtoolError(f"{p} is neither a .gguf file nor a model directory")


def render(summary: dict, indent: int = 0) -> str:
    """Aligned key: value lines, nested dicts indented."""
    lines = []
    width = max((len(k) for k in summary), default=0)
    for k, v in summary.items():
        if isinstance(v, dict) and v and k != "split":
            lines.append(" " * indent + f"{k}:")
            lines.append(render(v, indent + 2))
        else:
            if k == "parameters" and isinstance(v, int):
                v = f"{v} ({_fmt_params(v)})"
            elif isinstance(v, dict) and not v:
                v = "-"
            elif k == "split" and isinstance(v, dict):
                v = f"{v['index']} of {v['count']}"
            lines.append(" " * indent + f"{k:<{width}}  {v if v is not None else '-'}")
    return "\n".join(lines)
