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


def llama_quantize(src: Path, dst: Path, ftype: int, *, pure: bool = False,
                   imatrix: dict[str, np.ndarray] | None = None) -> dict:
    """llama.cpp's own quantizer (`llama_model_quantize` of the installed llama-cpp-python) on a
    GGUF file; returns the output's tensors by name. `pure`: every matrix gets the base type."""
    import ctypes

    import gguf
    from llama_cpp import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype, params.pure, params.nthread = ftype, pure, 2
    keep = []  # the buffers must outlive the call
    if imatrix:
        arr = (L.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            buf = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(buf)
            arr[i].name = name.encode()
            arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = buf.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(L.llama_model_imatrix_data))
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"
    return {t.name: t for t in gguf.GGUFReader(str(dst)).tensors}
