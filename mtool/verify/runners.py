"""Runners turn token ids into logits: transformers (torch) and llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..device import resolve_device
from ..errors import InputError, MtoolError
from ..gguf_file import gguf_metadata, is_gguf, open_gguf
from ..model.families import load_canonical
from .quantized import QuantizedRunner, dequantized_model, quantization_config
from .streamed import StreamedRunner, streams


class HFRunner:
    """A transformers model in float32 on cpu or cuda. Callers open `path` with load_canonical first,
    so the family checks (with convert's clear errors) run before transformers sees it."""

    kind = "transformers"

    def __init__(self, path: Path, device: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM

        self.device = resolve_device(device)
        self.path = Path(path)
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(self.device).eval()
        self.vocab_size = int(self.model.config.vocab_size)
        self.n_ctx = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.label = f"transformers ({self.device}, f32)"

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.model(torch.tensor([ids], device=self.device)).logits[0]
        return out.float().cpu().numpy()


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python, with an f32 KV cache so parity is not masked by cache rounding."""

    kind = "llama.cpp"

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None):
        try:
            import llama_cpp
        except ImportError:
            raise MtoolError("llama-cpp-python is not installed; it is needed to run GGUF files") from None
        self.path = Path(path)
        # garbage or truncated files: one clear line, not llama.cpp's abort; metadata kept for the report
        self.metadata = gguf_metadata(self.path, open_gguf(self.path))
        gpu = bool(llama_cpp.llama_supports_gpu_offload())
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                type_k=0, type_v=0, n_gpu_layers=-1 if gpu else 0, verbose=False, seed=0,
                n_threads=threads or max(1, os.cpu_count() or 1),
            )
        except ValueError as e:
            raise InputError(f"llama.cpp cannot load {path}: {e}") from None
        self.vocab_size = int(self.llm.n_vocab())
        self.label = f"llama.cpp ({'gpu offload' if gpu else 'cpu'}, f32 KV)"

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def tokenize(self, text: str) -> list[int]:
        # add_bos=True lets llama.cpp decide from the GGUF's add_bos_token, as it does at run time
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def open_candidate(path: Path, *, n_ctx: int, device: str, threads: int | None, reference: str = "auto"):
    """Runner for a candidate artifact: a GGUF file or an HF model directory. A GPTQ/AWQ candidate
    is dequantized layer by layer when `reference` streams (or, with auto, when it is large)."""
    path = Path(path)
    if is_gguf(path):
        return LlamaCppRunner(path, n_ctx, threads)
    if path.is_dir():
        q = quantization_config(path)
        if q:
            model = dequantized_model(path)
            if streams(model, reference):
                return StreamedRunner(model, device, what=f"{q.get('quant_method')} {q.get('bits')}-bit dequantized")
            return QuantizedRunner(path, device)
        model = load_canonical(path)
        if streams(model, reference):
            return StreamedRunner(model, device)
        return HFRunner(path, device)
    raise MtoolError(f"candidate {path} is neither a .gguf file nor a model directory")
