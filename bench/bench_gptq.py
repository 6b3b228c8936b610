"""Benchmark: GPTQ / AWQ of the generated ~0.5B Llama on this machine (CPU, or CUDA when present).

Calibration: 32 windows x 512 tokens of the built-in bilingual text (repeated to length).
Prints total wall time, peak RSS and per-layer seconds.

    python bench/bench_gptq.py [--method gptq|awq] [--layers 20] [--device auto]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import OUT, make_model, run_measured  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="gptq", choices=["gptq", "awq"])
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gptqmodel", action="store_true",
                    help="also run GPTQModel (from bench/out/gq-venv) on the same calibration windows")
    args = ap.parse_args()
    from mtool.data import builtin_text

    OUT.mkdir(parents=True, exist_ok=True)
    src = OUT / f"llama-{args.layers}L-bf16"
    nbytes = make_model(src, args.layers)
    calib = OUT / "calib.txt"
    calib.write_text("\n".join([builtin_text()] * 12), encoding="utf-8")
    dst = OUT / f"{args.method}-{args.layers}L"
    cmd = [sys.executable, "-m", "mtool.cli", "convert", str(src), "-o", str(dst), "--to", args.method, "--bits", "4",
           "--group-size", "128", "--calib", str(calib), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
           "--device", args.device, "--force", "-q"]
    wall, peak, code, out = run_measured(cmd)
    if code:
        raise SystemExit(f"mtool convert failed with exit code {code}")
    per_layer = [float(m.group(1)) for m in re.finditer(r"^\s+\d+\s+([\d.]+)\s", out, re.M)]
    print(out.splitlines()[0])
    print(f"\nmodel {nbytes / 1e6:.0f} MB bf16, {args.layers} layers; {args.method} 4-bit g128; "
          f"{args.nsamples} x {args.seqlen} calibration tokens")
    print(f"{'wall s':>8} {'peak RSS MB':>12} {'s/layer mean':>13} {'s/layer max':>12}")
    print(f"{wall:>8.1f} {peak / 1e6:>12.0f} {sum(per_layer) / len(per_layer):>13.2f} {max(per_layer):>12.2f}")
    import shutil

    shutil.rmtree(dst, ignore_errors=True)
    venv_py = OUT / "gq-venv" / "bin" / "python"
    if args.gptqmodel and venv_py.is_file():
        import os

        import torch

        from mtool.quantize.calib import calibration_ids

        ids_file = OUT / "calib_ids.pt"
        torch.save(calibration_ids(src, calib, args.nsamples, args.seqlen), ids_file)
        gdst = OUT / f"gptqmodel-{args.layers}L"
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS=str(os.cpu_count() or 2))
        gwall, gpeak, gcode, gout = run_measured([str(venv_py), str(Path(__file__).parent / "gptqmodel_quantize.py"),
                                                  str(src), str(gdst), str(ids_file)], env)
        status = "" if gcode == 0 else "  FAILED"
        print(f"GPTQModel: {gwall:>8.1f} s wall, peak RSS {gpeak / 1e6:.0f} MB{status}")
        shutil.rmtree(gdst, ignore_errors=True)


if __name__ == "__main__":
    main()
