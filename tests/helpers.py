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


def tiny_with_bf16_gguf(root: Path, tag: str, spec) -> tuple[Path, Path]:
    """A tiny HF model (mtool.tiny) and mtool's bf16 GGUF of it: the input llama-quantize starts from."""
    from mtool.model.families import load_canonical
    from mtool.convert.gguf_export import export_gguf
    from mtool.tiny import make_tiny_llama

    src = make_tiny_llama(root / tag, spec)
    bf16 = root / f"{tag}-bf16.gguf"
    export_gguf(load_canonical(src), bf16, outtype="bf16", progress=False)
    return src, bf16


def dir_listing(path: Path) -> set[str]:
    return {p.name for p in Path(path).iterdir()}


def llama_quantize(src: Path, dst: Path, ftype: int, *, pure: bool = False,
                   imatrix: dict[str, np.ndarray] | None = None, tensor_types: dict[str, int] | None = None,
                   output_type: int | None = None, token_embedding_type: int | None = None) -> dict:
    """llama.cpp's own quantizer (`llama_model_quantize` of the installed llama-cpp-python) on a
    GGUF file; returns the output's tensors by name. `pure`: every matrix gets the base type;
    `tensor_types`: regex -> ggml type (llama-quantize's --tensor-type)."""
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
    if tensor_types:
        tt = (L.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, qtype) in enumerate(tensor_types.items()):
            tt[i].pattern, tt[i].type = pattern.encode(), int(qtype)
        tt[len(tensor_types)].pattern = None
        keep.append(tt)
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(L.llama_model_tensor_override))
    if output_type is not None:
        params.output_tensor_type = int(output_type)
    if token_embedding_type is not None:
        params.token_embedding_type = int(token_embedding_type)
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc})"
    return {t.name: t for t in gguf.GGUFReader(str(dst)).tensors}


def imatrix_importances(path: Path) -> dict[str, np.ndarray]:
    """Importances of a GGUF imatrix file as llama-quantize's load_imatrix hands them to the
    quantizer (sum / count per expert row, 1.0 for an expert without tokens), read with gguf-py."""
    import gguf

    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = np.rint(tensors[base + ".counts"].reshape(-1)).astype(np.float32)
        rows = sums.reshape(len(counts), -1)
        vals = np.empty_like(rows)
        for j, c in enumerate(counts):
            vals[j] = rows[j] / c if c > 0 else 1.0
        out[base] = vals.reshape(-1)
    return out


def same_tensors(a: Path, b: dict) -> None:
    """The GGUF at `a` holds exactly the tensors `b` (name -> ReaderTensor): types and bytes."""
    import gguf

    ours = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    assert ours.keys() == b.keys()
    for name, t in ours.items():
        assert t.tensor_type == b[name].tensor_type, (name, t.tensor_type.name, b[name].tensor_type.name)
        assert np.asarray(t.data).tobytes() == np.asarray(b[name].data).tobytes(), name
