"""llama.cpp tokenization of our GGUF equals the HF tokenizer's, for SentencePiece and BPE."""

from __future__ import annotations

import pytest
from llama_cpp import Llama
from transformers import AutoTokenizer

from mtool.model.families import load_canonical
from mtool.convert.gguf_export import export_gguf
from mtool.data import builtin_text

MIXED = (
    "Release 3.5 of the model 支持中文和English混合输入, with numbers like 1234567 and 3.14159.\n"
    "  Two leading spaces,\ttabs, and rare characters 鑫龘 that need byte fallback; emoji 🚀 too.\n"
    "最后一行:转换后的分词必须完全一致!"
)


@pytest.mark.parametrize("shape", ["mha_tied_bpe", "gqa_untied_spm", "ziya_padded_spm"])
@pytest.mark.parametrize("text", [MIXED, builtin_text()], ids=["mixed", "builtin"])
def test_llamacpp_tokenizes_like_hf(shape, text, tiny_models, tmp_path):
    src = tiny_models[shape]
    out = tmp_path / "v.gguf"
    export_gguf(load_canonical(src), out, outtype="f16", progress=False)
    hf = AutoTokenizer.from_pretrained(str(src))(text)["input_ids"]
    llm = Llama(str(out), vocab_only=True, verbose=False)
    cpp = llm.tokenize(text.encode("utf-8"), add_bos=True)
    assert cpp == hf
    assert len(hf) > 20
