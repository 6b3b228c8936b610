"""mtool's GGUF beside llama.cpp's own converter's, for tiny models of each architecture spec.

For Qwen2 (tied and untied) and Llama, builds a tiny seeded model (mtool.tiny), converts it to
f32 with `mtool convert` and with `convert_hf_to_gguf.py` of the llama.cpp that the installed
llama-cpp-python vendors (the sdist bench_convert.py downloads), and compares:
architecture, every hparam key and value, tensor names, types, shapes and values, and the
vocabulary keys. Prints one table per model and exits 1 when an architecture, hparam or tensor
differs.

The converter recognizes a BPE pre-tokenizer by hashing the tokenization of a fixed text with
the real Hub tokenizer; a tokenizer trained on the fly has no known hash, so the pre-tokenizer
name is given to it (qwen2), exactly as mtool finds it from the tokenizer.json regex.

    python bench/compare_converter.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import llamacpp_converter  # noqa: E402

# converter run with the pre-tokenizer name given (see the module docstring)
WRAPPER = """
import runpy, sys
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/gguf-py")
import conversion.base as base
pre = sys.argv[2]
if pre:
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
script = sys.argv[1] + "/convert_hf_to_gguf.py"
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""

MODELS = {
    "qwen2-untied": dict(arch="qwen2", tokenizer="qwen2", tokenizer_vocab=800, kv_heads=2, tied=False, extra_rows=13),
    "qwen2-tied": dict(arch="qwen2", tokenizer="qwen2", tokenizer_vocab=800, tied=True),
    "llama-gqa": dict(tokenizer="spm", kv_heads=2, tied=False),
}
PRE = {"qwen2": "qwen2"}


def read(path: Path) -> tuple[dict, dict]:
    import gguf

    r = gguf.GGUFReader(path)
    kv = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        kv[k] = tuple(v) if isinstance(v, list) else v
    tensors = {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), np.array(t.data)) for t in r.tensors}
    return kv, tensors


def compare(name: str, ours: Path, theirs: Path) -> bool:
    kv_a, t_a = read(ours)
    kv_b, t_b = read(theirs)
    same = True
    print(f"\n== {name}: mtool {ours.name} vs llama.cpp {theirs.name}")
    keys = sorted(set(kv_a) | set(kv_b))
    for k in keys:
        a, b = kv_a.get(k, "<absent>"), kv_b.get(k, "<absent>")
        if k.startswith("general.") and k not in ("general.architecture", "general.file_type"):
            continue  # names, sizes and dates the tools derive differently
        ok = a == b if not isinstance(a, float) else isinstance(b, float) and abs(a - b) <= 1e-6 * abs(b)
        if k.startswith("tokenizer."):
            if not ok:
                print(f"   vocab  {k:<40} differs: mtool {str(a)[:60]} / llama.cpp {str(b)[:60]}")
            continue
        print(f"  {'ok' if ok else 'DIFF':>4}  {k:<40} {str(a)[:40]:<40} {'' if ok else str(b)[:40]}")
        same &= ok
    names = sorted(set(t_a) | set(t_b))
    bad = []
    for n in names:
        if n not in t_a or n not in t_b:
            bad.append(f"{n}: only in {'mtool' if n in t_a else 'llama.cpp'}")
            continue
        (ta, sa, da), (tb, sb, db) = t_a[n], t_b[n]
        if (ta, sa) != (tb, sb) or not np.array_equal(da, db):
            bad.append(f"{n}: mtool {ta} {sa} / llama.cpp {tb} {sb}, values equal: {np.array_equal(da, db)}")
    print(f"  tensors: {len(names)} names, {len(names) - len(bad)} identical (name, type, shape, values)")
    for b in bad[:10]:
        print(f"  DIFF  {b}")
    return same and not bad


def main() -> int:
    from mtool.tiny import TinySpec, make_tiny_llama

    conv = llamacpp_converter()
    if conv is None:
        print("llama.cpp's converter is not available", file=sys.stderr)
        return 2
    all_same = True
    with tempfile.TemporaryDirectory(prefix="mtool-cmp-") as tmp:
        for name, fields in MODELS.items():
            src = make_tiny_llama(Path(tmp) / name, TinySpec(seed=7, **fields))
            ours, theirs = Path(tmp) / f"{name}-mtool.gguf", Path(tmp) / f"{name}-llamacpp.gguf"
            subprocess.run([sys.executable, "-m", "mtool.cli", "convert", str(src), "-o", str(ours), "--outtype", "f32",
                            "-q"], check=True)
            subprocess.run([sys.executable, "-c", WRAPPER, str(conv.parent), PRE.get(fields.get("tokenizer"), ""),
                            str(src), "--outfile", str(theirs), "--outtype", "f32"], check=True,
                           env=dict(os.environ), capture_output=True)
            all_same &= compare(name, ours, theirs)
    print("\nresult:", "architecture, hparams and tensors identical" if all_same else "DIFFERENCES (see above)")
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
