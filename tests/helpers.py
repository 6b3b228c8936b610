"""Independent reference computations for tests (transformers and llama-cpp-python directly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy().astype(np.float64)


def llamacpp_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True,
                type_k=0, type_v=0, verbose=False, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def hf_ids(model_dir: Path, text: str, limit: int = 256) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))(text)["input_ids"][:limit]


def mean_kld(ref: np.ndarray, cand: np.ndarray) -> float:
    """KL(ref || cand) per position with torch, independent of mtool.verify.metrics."""
    lr = torch.log_softmax(torch.from_numpy(ref), -1)
    lc = torch.log_softmax(torch.from_numpy(cand), -1)
    return float(torch.nn.functional.kl_div(lc, lr, log_target=True, reduction="none").sum(-1).mean())


def dir_listing(path: Path) -> set[str]:
    return {p.name for p in Path(path).iterdir()}
