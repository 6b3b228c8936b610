"""Opening a model's HF tokenizer without remote code."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path


def open_tokenizer(tok_dir: Path):
    """AutoTokenizer for `tok_dir`; a remote-code tokenizer class (TeleChat's) is replaced by
    LlamaTokenizer over the same SentencePiece model, as `convert --to hf` writes it."""
    from transformers import AutoTokenizer

    from .checkpoint import TOKENIZER_FILES
    from .convert.hf_export import native_tokenizer_config
    from .transformers_env import quiet_transformers

    quiet_transformers()

    tc = native_tokenizer_config(Path(tok_dir))
    if tc is None:
        return AutoTokenizer.from_pretrained(str(tok_dir))
    with tempfile.TemporaryDirectory(prefix="mtool-tok-") as tmp:
        for fname in TOKENIZER_FILES:
            if (Path(tok_dir) / fname).is_file():
                shutil.copy2(Path(tok_dir) / fname, Path(tmp) / fname)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tc))
        return AutoTokenizer.from_pretrained(tmp)
