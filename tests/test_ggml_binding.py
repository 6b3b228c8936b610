"""mtool.ggml: the ctypes binding to libggml's quantizers.

Bytes are compared with what llama.cpp's own quantizer (`llama_model_quantize` of the installed
llama-cpp-python, `pure` so every matrix gets the file's base type) writes from the same f32
GGUF, with and without an importance matrix: the binding must call the very same kernels the
same way. Preconditions that would make libggml abort the process are errors instead.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import CancelledError
import sys

import gguf
import numpy as np
import pytest
from llama_cpp import llama_cpp as L

from mtool.model.families import load_canonical
from mtool.convert.gguf_export import export_gguf
from mtool.errors import InputError, MtoolError, UsageError
from mtool.ggml import GGML, _find_library, ggml
from mtool.tiny import TinySpec, make_tiny_llama

from .helpers import llama_quantize

Q = gguf.GGMLQuantizationType
# llama ftype -> the type `pure` gives every matrix
FTYPES = {
    "q4_k_m": (L.LLAMA_FTYPE_MOSTLY_Q4_K_M, Q.Q4_K), "q5_k_m": (L.LLAMA_FTYPE_MOSTLY_Q5_K_M, Q.Q5_K),
    "q6_k": (L.LLAMA_FTYPE_MOSTLY_Q6_K, Q.Q6_K), "q3_k_m": (L.LLAMA_FTYPE_MOSTLY_Q3_K_M, Q.Q3_K),
    "q2_k": (L.LLAMA_FTYPE_MOSTLY_Q2_K, Q.Q2_K), "iq4_xs": (L.LLAMA_FTYPE_MOSTLY_IQ4_XS, Q.IQ4_XS),
    "iq4_nl": (L.LLAMA_FTYPE_MOSTLY_IQ4_NL, Q.IQ4_NL), "q8_0": (L.LLAMA_FTYPE_MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (L.LLAMA_FTYPE_MOSTLY_Q4_0, Q.Q4_0),
}


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    """A tiny GQA Llama whose rows are multiples of 256 (K-quant super-blocks), as f32 GGUF."""
    root = tmp_path_factory.mktemp("ggml")
    src = make_tiny_llama(root / "src", TinySpec(hidden=256, intermediate=512, heads=4, kv_heads=2, tied=False,
                                                  tokenizer_vocab=700, seed=5))
    out = root / "f32.gguf"
    export_gguf(load_canonical(src), out, outtype="f32", progress=False)
    return out


def _tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("ftype", list(FTYPES))
def test_same_bytes_as_llama_model_quantize(f32_gguf, tmp_path, ftype):
    llama_ftype, qtype = FTYPES[ftype]
    theirs = llama_quantize(f32_gguf, tmp_path / "q.gguf", llama_ftype, pure=True)
    source = _tensors(f32_gguf)
    compared = 0
    for name, t in theirs.items():
        if t.tensor_type != qtype:
            assert t.tensor_type == Q.F32 and len(t.shape) == 1, (name, t.tensor_type)
            continue
        x = np.asarray(source[name].data, dtype=np.float32)
        ours = ggml().quantize(x, qtype, name=name)
        assert ours.tobytes() == np.asarray(t.data).tobytes(), name
        compared += 1
    assert compared == 2 + 2 * 7  # token_embd, output and every matrix of both layers


def test_same_bytes_with_an_importance_matrix(f32_gguf, tmp_path):
    source = _tensors(f32_gguf)
    rng = np.random.default_rng(0)
    imatrix = {n: rng.gamma(2.0, 1.0, size=t.shape[0]).astype(np.float32)
               for n, t in source.items() if len(t.shape) == 2 and n != "token_embd.weight"}
    llama_ftype, qtype = FTYPES["iq4_xs"]
    theirs = llama_quantize(f32_gguf, tmp_path / "q.gguf", llama_ftype, pure=True, imatrix=imatrix)
    differs = 0
    for name, imp in imatrix.items():
        x = np.asarray(source[name].data, dtype=np.float32)
        ours = ggml().quantize(x, qtype, imp, name=name)
        assert ours.tobytes() == np.asarray(theirs[name].data).tobytes(), name
        differs += ours.tobytes() != ggml().quantize(x, qtype, name=name).tobytes()
    assert differs == len(imatrix)  # the importances were used, not ignored


def test_threads_do_not_change_bytes():
    x = np.random.default_rng(1).standard_normal((1000, 512)).astype(np.float32)
    one = ggml().quantize(x, Q.Q4_K, threads=1)
    assert np.array_equal(one, ggml().quantize(x, Q.Q4_K, threads=4))
    assert one.shape == (1000, ggml().row_size(Q.Q4_K, 512)) == (1000, 512 // 256 * 144)


def test_half_storage_quantizes_as_its_float32_values():
    """bf16/f16 storage is converted job by job in the quantizer threads: the bytes must be those of
    quantizing its float32 values (rows not a multiple of a job's rows, with and without importances)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3001, 768)).astype(np.float32)
    imp = rng.random(768).astype(np.float32)
    b16 = (x.view(np.uint32) >> 16).astype(np.uint16)  # a bf16 value of each, exactly representable
    f16 = x.astype(np.float16)
    cases = [(b16, "bfloat16", (b16.astype(np.uint32) << 16).view(np.float32)), (f16, "float16", f16.astype(np.float32))]
    g = ggml()
    for storage, src, values in cases:
        for qtype, im in ((Q.Q4_K, None), (Q.Q8_0, None), (Q.IQ4_XS, imp)):
            assert np.array_equal(g.quantize(storage, qtype, im, src=src), g.quantize(values, qtype, im)), (src, qtype)
    with pytest.raises(ValueError, match="must be stored as"):
        g.quantize(x, Q.Q4_K, src="bfloat16")


def test_queued_tensors_keep_their_bytes():
    """Tensors submitted back to back share the pool's queue; each result is its own tensor's bytes."""
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((rows, 512)).astype(np.float32) for rows in (700, 3, 1500)]
    g = ggml()
    pending = [g.submit(x, Q.Q5_K) for x in xs]
    for x, p in zip(xs, pending):
        assert np.array_equal(p.result(), g.quantize(x, Q.Q5_K, threads=1))


def test_preconditions_are_errors_not_aborts():
    g = ggml()
    x = np.ones((4, 320), dtype=np.float32)
    with pytest.raises(UsageError, match="blocks of 256"):
        g.quantize(x, Q.Q4_K)
    with pytest.raises(UsageError, match="needs an importance matrix"):
        g.quantize(np.ones((4, 256), dtype=np.float32), Q.IQ2_XXS)
    with pytest.raises(InputError, match="has 100 values"):
        g.quantize(np.ones((4, 256), dtype=np.float32), Q.IQ4_XS, np.ones(100, dtype=np.float32))
    assert g.requires_imatrix(Q.IQ2_XXS) and not g.requires_imatrix(Q.Q4_K)
    assert g.type_name(Q.IQ4_XS) == "iq4_xs" and g.block_size(Q.Q6_K) == 256


def test_missing_library_is_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(MtoolError, match="libggml-base not found"):
        _find_library(tmp_path)
    (tmp_path / "libggml-base.so.0").write_bytes(b"not a library")
    with pytest.raises(MtoolError, match="cannot load"):
        GGML(_find_library(tmp_path))


def test_iq2_without_imatrix_does_not_abort_the_process():
    """What a direct call would do (GGML_ASSERT kills the interpreter) is refused in Python."""
    code = ("import numpy as np; from mtool.ggml import ggml\n"
            "try:\n    ggml().quantize(np.ones((2, 256), np.float32), 16)\n"
            "except Exception as e:\n    print(type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "UsageError", r.stderr


def test_a_cancelled_tensor_leaves_no_queued_work():
    """An interrupted run drops the jobs not started (the interpreter would join them at exit)."""
    x = np.random.default_rng(4).standard_normal((4096, 4096)).astype(np.float32)  # 64 jobs
    p = ggml().submit(x, Q.Q4_K)
    p.cancel()
    assert sum(f.cancelled() for f in p._futures) > len(p._futures) // 2
    with pytest.raises(CancelledError):
        p.result()
    one = np.ones((2, 256), dtype=np.float32)  # the pool still works
    assert np.array_equal(ggml().submit(one, Q.Q4_K).result(), ggml().quantize(one, Q.Q4_K, threads=1))
