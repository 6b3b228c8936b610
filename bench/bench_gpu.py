"""Benchmark: the CUDA paths of mtool on a generated 7B-shaped stack and the ~0.5B benchmark model.

For each model (random bf16 weights, written here): GPTQ and AWQ 4-bit g128 (`convert --to gptq|awq
--device cuda`), the importance matrix (`mtool imatrix --device cuda`), and verify with the reference
on the GPU, streamed and whole, against the GPTQ checkpoint (dequantized on the GPU) and, when
llama-cpp-python imports, against a q8_0 GGUF (llama.cpp on the CPU). Each step runs in its own
process, mtool's CLI in-process there, so the peak GPU memory that torch's allocator saw is read
after it. Random models predict nearly flat distributions: verify's verdict is FAIL (exit 1); the
figures here are time and memory.

    python bench/bench_gpu.py [--models 7b,0.5b,moe] [--layers7b 4] [--layers-moe 1] [--log-dir DIR]
    python bench/bench_gpu.py --device cpu ...      # the same steps on the CPU, for comparison

Shapes: 7b = hidden 4096, ffn 11008, 32 heads (MHA), 32000 vocab (Llama-2-7B's layer); 0.5b = the
conversion benchmark's (hidden 1280, ffn 3456, 20 heads / 4 kv heads, 20 layers); moe = Mixtral-8x7B's
layer (hidden 4096, ffn 14336, 8 experts top-2, 32 / 8 heads), Huozi 3.5's shape.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # mtool from this checkout, installed or not

import bench_convert  # noqa: E402
from bench_convert import MOE, OUT, make_model, make_moe_model  # noqa: E402

SHAPES = {
    "7b": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    "0.5b": dict(bench_convert.BASE),
    "moe": dict(MOE),  # Mixtral-8x7B's layer (Huozi 3.5's shape), made by make_moe_model
}
# calibration per model: GPTQ's usual 128 x 2048 on the 7B stack; the CPU benchmark's 32 x 512 on 0.5B
CALIB = {"7b": {"gptq": (128, 2048), "awq": (128, 512), "imatrix": (128, 512)},
         "0.5b": {"gptq": (32, 512), "awq": (32, 512), "imatrix": (32, 512)},
         "moe": {"gptq": (128, 512), "awq": (128, 512), "imatrix": (128, 512)}}
VERIFY = {"7b": (512, 32), "0.5b": (512, 32), "moe": (512, 32)}  # ctx, windows


def step(argv: list[str]) -> None:
    """Run one mtool command in this process and print the GPU allocator's peak after it."""
    import torch

    from mtool.cli import cli

    t = time.perf_counter()
    code = 0
    try:
        cli.main(argv, standalone_mode=False)
    except SystemExit as e:
        code = int(e.code or 0)
    wall = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    reserved = torch.cuda.max_memory_reserved() if torch.cuda.is_available() else 0
    print(json.dumps({"STEP": True, "code": code, "wall": wall, "gpu_peak": peak, "gpu_reserved": reserved}))


def run_step(argv: list[str], log: Path) -> dict:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--step", json.dumps(argv)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    wall = time.perf_counter() - t
    log.write_text(f"$ mtool {' '.join(argv)}\n{p.stdout}\n--- stderr ---\n{p.stderr[-20000:]}")
    res = {"code": p.returncode, "wall": wall, "gpu_peak": 0, "gpu_reserved": 0, "in_wall": wall, "out": p.stdout}
    for line in p.stdout.splitlines():
        if line.startswith('{"STEP"'):
            d = json.loads(line)
            res.update(code=d["code"], gpu_peak=d["gpu_peak"], gpu_reserved=d["gpu_reserved"], in_wall=d["wall"])
    if p.returncode and p.returncode != 1:
        print(f"  step failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
    return res


def per_layer(out: str) -> list[float]:
    return [float(m.group(1)) for m in re.finditer(r"^\s+\d+\s+([\d.]+)\s", out, re.M)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="7b,0.5b")
    ap.add_argument("--layers7b", type=int, default=4)
    ap.add_argument("--layers-moe", type=int, default=1)
    ap.add_argument("--verify-modes", default="streamed,whole", help="reference modes verify runs with")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", default="gptq,awq,imatrix,verify")
    ap.add_argument("--log-dir", type=Path, default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny calibration and windows, 1-2 layers: checks the script")
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        return step(json.loads(args.step))
    if args.smoke:
        for c in CALIB.values():
            c.update({k: (4, 64) for k in c})
        VERIFY.update({k: (128, 2) for k in VERIFY})
    from mtool.data import builtin_text

    logs = args.log_dir or OUT / "gpu-logs"
    logs.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    calib = OUT / "calib-gpu.txt"  # ~270k tokens: 128 x 2048 windows (timing only: the text repeats)
    calib.write_text("\n".join([builtin_text()] * 120), encoding="utf-8")
    vtext = OUT / "verify-gpu.txt"  # ~18k tokens: 32 windows of 512 (verify tokenizes all of --data)
    vtext.write_text("\n".join([builtin_text()] * 8), encoding="utf-8")
    try:
        importlib.import_module("llama_cpp")  # only whether it loads (its shared libraries too)
        have_llama = True
    except Exception:  # noqa: BLE001 - any failure to load means: no GGUF candidate
        have_llama = False
    rows = []
    dev, steps = args.device, args.steps.split(",")
    for tag in args.models.split(","):
        if tag != "moe":
            bench_convert.BASE.update(SHAPES[tag])
        layers = {"7b": args.layers7b, "moe": args.layers_moe}.get(tag, 20) if not args.smoke else 1 + (tag == "0.5b")
        t = time.perf_counter()
        src = OUT / f"gpu-{tag}-{layers}L-bf16"
        nbytes = make_moe_model(src, layers) if tag == "moe" else make_model(src, layers)
        print(f"{tag}: {nbytes / 2**30:.2f} GiB bf16, {layers} layers (made in {time.perf_counter() - t:.0f} s)",
              flush=True)
        gq = OUT / f"gpu-{tag}-gptq"
        for method in ("gptq", "awq"):
            if method not in steps and not (method == "gptq" and "verify" in steps):
                continue
            n, s = CALIB[tag][method]
            out = gq if method == "gptq" else OUT / f"gpu-{tag}-awq"
            r = run_step(["convert", str(src), "-o", str(out), "--to", method, "--bits", "4", "--group-size", "128",
                          "--calib", str(calib), "--nsamples", str(n), "--seqlen", str(s), "--device", dev,
                          "--force", "-q"], logs / f"{tag}-{method}.log")
            pl = per_layer(r["out"])
            rows.append((tag, f"{method} {n}x{s}", r, pl, ""))
            print(f"  {method}: {r['wall']:.1f} s, code {r['code']}", flush=True)
        if "imatrix" in steps:
            n, s = CALIB[tag]["imatrix"]
            r = run_step(["imatrix", str(src), "-o", str(OUT / f"gpu-{tag}.imatrix.gguf"), "--calib", str(calib),
                          "--nsamples", str(n), "--seqlen", str(s), "--device", dev, "--force", "-q"],
                         logs / f"{tag}-imatrix.log")
            m = re.search(r"\(([\d.]+) tokens/s\)", r["out"])
            rows.append((tag, f"imatrix {n}x{s}", r, [], f"{m.group(1)} tok/s" if m else ""))
            print(f"  imatrix: {r['wall']:.1f} s, code {r['code']}", flush=True)
        if "verify" in steps:
            ctx, windows = VERIFY[tag]
            cands = [("gptq", gq)]
            if have_llama:
                q8 = OUT / f"gpu-{tag}-q8_0.gguf"
                if not q8.is_file():
                    subprocess.run([sys.executable, "-m", "mtool.cli", "convert", str(src), "-o", str(q8),
                                    "--outtype", "q8_0", "-q"], check=True)
                cands.append(("q8_0 gguf", q8))
            for cname, cand in cands:
                for mode in args.verify_modes.split(","):
                    r = run_step(["verify", str(src), str(cand), "--device", dev, "--reference", mode, "--data",
                                  str(vtext), "--ctx", str(ctx), "--max-windows", str(windows), "-q"],
                                 logs / f"{tag}-verify-{mode}-{cname.split()[0]}.log")
                    pos = re.search(r"^positions\s+(\d+)", r["out"], re.M)
                    tps = f"{int(pos.group(1)) / r['in_wall']:.0f} pos/s" if pos else "no positions"
                    rows.append((tag, f"verify {mode} vs {cname} ({windows}x{ctx})", r, [], tps))
                    print(f"  verify {mode} vs {cname}: {r['wall']:.1f} s, code {r['code']}", flush=True)
    import torch

    name = torch.cuda.get_device_name() if dev == "cuda" and torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    print(f"\ndevice: {name}; torch {torch.__version__}")
    print(f"{'model':<5} {'step':<40} {'exit':>4} {'wall s':>7} {'in-proc s':>9} {'s/layer mean':>12} "
          f"{'max':>6} {'GPU peak GiB':>12} {'reserved':>8}  rate")
    for tag, what, r, pl, rate in rows:
        mean = f"{sum(pl) / len(pl):.2f}" if pl else ""
        mx = f"{max(pl):.2f}" if pl else ""
        print(f"{tag:<5} {what:<40} {r['code']:>4} {r['wall']:>7.1f} {r['in_wall']:>9.1f} {mean:>12} {mx:>6} "
              f"{r['gpu_peak'] / 2**30:>12.2f} {r['gpu_reserved'] / 2**30:>8.2f}  {rate}")


if __name__ == "__main__":
    main()
