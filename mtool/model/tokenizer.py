"""A model's HF tokenizer: opening it without remote code, and the tokenizer_config that does so."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .checkpoint import TOKENIZER_FILES

SPM_TOKENIZER_CLASS = "LlamaTokenizer"  # transformers' class over a SentencePiece tokenizer.model
# tokenizer classes transformers has itself; anything else is remote code
NATIVE_TOKENIZERS = {"LlamaTokenizer", "LlamaTokenizerFast", "PreTrainedTokenizerFast", "TokenizersBackend",
                     "Qwen2Tokenizer", "Qwen2TokenizerFast"}


def native_tokenizer_config(tok_dir: Path) -> dict | None:
    """tokenizer_config.json with a remote-code tokenizer class replaced, or None if unchanged."""
    path = Path(tok_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None
    tc = json.loads(path.read_text(encoding="utf-8"))
    if tc.get("tokenizer_class") in NATIVE_TOKENIZERS and "auto_map" not in tc:
        return None
    tc.pop("auto_map", None)
    tc["tokenizer_class"] = SPM_TOKENIZER_CLASS if (Path(tok_dir) / "tokenizer.model").is_file() else "PreTrainedTokenizerFast"
    return tc


def open_tokenizer(tok_dir: Path):
    """AutoTokenizer for `tok_dir`; a remote-code tokenizer class (TeleChat's) is replaced by
    LlamaTokenizer over the same SentencePiece model, as `convert --to hf` writes it."""
    from transformers import AutoTokenizer

    tc = native_tokenizer_config(Path(tok_dir))
    if tc is None:
        return AutoTokenizer.from_pretrained(str(tok_dir))
    with tempfile.TemporaryDirectory(prefix="mtool-tok-") as tmp:
        for fname in TOKENIZER_FILES:
            if (Path(tok_dir) / fname).is_file():
                shutil.copy2(Path(tok_dir) / fname, Path(tmp) / fname)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(tc))
        return AutoTokenizer.from_pretrained(tmp)
