"""Benchmark: HF bf16 -> Q4_K_M GGUF, mtool's one pass vs llama.cpp's two-step route.

llama.cpp's route is what its README prescribes: `convert_hf_to_gguf.py --outtype bf16`, then
`llama-quantize` (here `llama_model_quantize` of the installed llama-cpp-python, the same code),
with the full bf16 GGUF on disk in between. mtool streams the HF tensors through the same policy
and libggml kernels into the file. Prints wall time, peak RSS and the extra disk each route
needs beyond its output. Also: `mtool quantize` against `llama_model_quantize` on the same bf16
GGUF, and `mtool imatrix` throughput (tokens/s) on the first size.

    python bench/bench_kquant.py                 # ~0.5B model
    python bench/bench_kquant.py --sizes 0.5,1 --outtype q4_k_m --imatrix-tokens 32x512
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import OUT, llamacpp_converter, make_model, run_measured  # noqa: E402

QUANTIZE = """
import ctypes, sys, gguf
from llama_cpp import llama_cpp as L
p = L.llama_model_quantize_default_params()
p.ftype = int(gguf.LlamaFileType["MOSTLY_" + sys.argv[3].upper()])
sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5", help="model sizes in B params (0.5 = 20 layers)")
    ap.add_argument("--outtype", default="q4_k_m")
    ap.add_argument("--imatrix-tokens", default="32x512", help="NSAMPLESxSEQLEN for the imatrix run ('' to skip)")
    ap.add_argument("--device", default="cpu", help="device of the imatrix run")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    conv = llamacpp_converter()
    rows, imatrix_rows = [], []
    for size in [float(s) for s in args.sizes.split(",")]:
        layers = max(1, round(20 * size / 0.5))
        src = OUT / f"llama-{layers}L-bf16"
        nbytes = make_model(src, layers)
        ours = OUT / f"mtool-{layers}L-{args.outtype}.gguf"
        wall, rss, code, _ = run_measured([sys.executable, "-m", "mtool.cli", "convert", str(src), "-o", str(ours),
                                           "--outtype", args.outtype, "--force", "-q"])
        rows.append(("mtool convert (one pass)", layers, nbytes, wall, rss, 0, code))
        if conv is not None:
            bf16 = OUT / f"llamacpp-{layers}L-bf16.gguf"
            theirs = OUT / f"llamacpp-{layers}L-{args.outtype}.gguf"
            env = dict(os.environ, PYTHONPATH=str(conv.parent / "gguf-py"))
            w1, r1, c1, _ = run_measured([sys.executable, str(conv), str(src), "--outfile", str(bf16),
                                          "--outtype", "bf16"], env)
            extra = bf16.stat().st_size if bf16.exists() else 0
            w2, r2, c2, _ = run_measured([sys.executable, "-c", QUANTIZE, str(bf16), str(theirs), args.outtype])
            rows.append(("llama.cpp convert bf16 + quantize", layers, nbytes, w1 + w2, max(r1, r2), extra, c1 or c2))
            rows.append(("  llama_model_quantize (bf16 GGUF)", layers, extra, w2, r2, 0, c2))
            req = OUT / f"mtool-requant-{layers}L-{args.outtype}.gguf"
            w3, r3, c3, _ = run_measured([sys.executable, "-m", "mtool.cli", "quantize", str(bf16), "-o", str(req),
                                          "--outtype", args.outtype, "--force", "-q"])
            rows.append(("  mtool quantize (bf16 GGUF)", layers, extra, w3, r3, 0, c3))
        if args.imatrix_tokens and size == float(args.sizes.split(",")[0]):
            imatrix_rows.append(_imatrix_run(src, layers, args.imatrix_tokens, args.device))
        for f in OUT.glob("*.gguf"):
            f.unlink()
    print(f"\n{'route':<34} {'layers':>6} {'input MB':>9} {'wall s':>7} {'peak RSS MB':>11} {'extra disk MB':>13}")
    for tool, layers, nbytes, wall, rss, extra, code in rows:
        status = "" if code == 0 else "  FAILED"
        print(f"{tool:<34} {layers:>6} {nbytes / 1e6:>9.0f} {wall:>7.2f} {rss / 1e6:>11.0f} {extra / 1e6:>13.0f}{status}")
    if imatrix_rows:
        print(f"\n{'mtool imatrix':<34} {'layers':>6} {'tokens':>7} {'wall s':>7} {'tokens/s':>9} {'peak RSS MB':>11}")
        for layers, tokens, wall, rss, device, code in imatrix_rows:
            status = "" if code == 0 else "  FAILED"
            print(f"{device:<34} {layers:>6} {tokens:>7} {wall:>7.2f} {tokens / wall:>9.0f} {rss / 1e6:>11.0f}{status}")


def _imatrix_run(src: Path, layers: int, spec: str, device: str):
    """`mtool imatrix` over NSAMPLES x SEQLEN tokens of the built-in text repeated (wall time
    includes start-up and reading the model)."""
    from mtool.data import builtin_text

    nsamples, seqlen = (int(v) for v in spec.split("x"))
    calib = OUT / "calib.txt"
    calib.write_text("\n\n".join([builtin_text()] * 12))
    out = OUT / f"mtool-{layers}L.imatrix.gguf"
    wall, rss, code, _ = run_measured([sys.executable, "-m", "mtool.cli", "imatrix", str(src), "-o", str(out),
                                       "--calib", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
                                       "--device", device, "--force", "-q"])
    return layers, nsamples * seqlen, wall, rss, device, code


if __name__ == "__main__":
    main()
