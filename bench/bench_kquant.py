"""Benchmark: HF bf16 -> Q4_K_M GGUF, mtool's one pass vs llama.cpp's two-step route.

llama.cpp's route is what its README prescribes: `convert_hf_to_gguf.py --outtype bf16`, then
`llama-quantize` (here `llama_model_quantize` of the installed llama-cpp-python, the same code),
with the full bf16 GGUF on disk in between. mtool streams the HF tensors through the same policy
and libggml kernels into the file. Every route runs once per round, rounds interleaved (this VM's
CPU speed drifts by 10-25 %); prints the median and range of wall time and of CPU seconds, peak RSS
and the extra disk each route needs beyond its output. Also: `mtool quantize` against
`llama_model_quantize` on the same bf16 GGUF (llama.cpp's; the two alternate which runs first, each
after a sync), and `mtool imatrix` throughput (tokens/s) on the first size.

    python bench/bench_kquant.py                 # ~0.5B model
    python bench/bench_kquant.py --sizes 0.5,1 --outtype q4_k_m --imatrix-tokens 32x512 --rounds 3
    python bench/bench_kquant.py --sizes '' --moe-layers 1 --rounds 1 --imatrix-tokens ''   # real-size MoE layer
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from statistics import median
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import OUT, llamacpp_converter, make_model, make_moe_model, run_measured  # noqa: E402

QUANTIZE = """
import ctypes, sys, gguf
from llama_cpp import llama_cpp as L
p = L.llama_model_quantize_default_params()
p.ftype = int(gguf.LlamaFileType["MOSTLY_" + sys.argv[3].upper()])
sys.exit(L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


def timed(cmd: list[str], env: dict | None = None, output: Path | None = None) -> tuple[float, int, int, float]:
    """run_measured plus the child's CPU seconds (user + system): on this VM the CPU's speed varies
    from run to run, so the CPU time tells a slower machine from more work. `output` is removed (and
    synced) first: freeing an earlier run's file is no part of the run (see bench_convert.repeat)."""
    if output is not None and output.exists():
        output.unlink()
        os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, rss, code, _ = run_measured(cmd, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, rss, code, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5", help="model sizes in B params (0.5 = 20 layers)")
    ap.add_argument("--outtype", default="q4_k_m")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every route; medians are printed")
    ap.add_argument("--imatrix-tokens", default="32x512", help="NSAMPLESxSEQLEN for the imatrix run ('' to skip)")
    ap.add_argument("--device", default="cpu", help="device of the imatrix run")
    ap.add_argument("--moe-layers", type=int, default=0,
                    help="also a Mixtral of N real-size layers (hidden 4096, ffn 14336, 8 experts: 2.8 GB of experts each)")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    conv = llamacpp_converter()
    rows, ratios, imatrix_rows = [], [], []
    cases = []
    for size in [float(s) for s in args.sizes.split(",") if s]:
        layers = max(1, round(20 * size / 0.5))
        cases.append((size, layers, OUT / f"llama-{layers}L-bf16", make_model))
    if args.moe_layers:
        cases.append((None, args.moe_layers, OUT / f"mixtral-4096h-{args.moe_layers}L-bf16", make_moe_model))
    for size, layers, src, make in cases:
        nbytes = make(src, layers)
        runs: dict[str, list] = {}
        extra = 0
        for rnd in range(args.rounds):  # interleaved: every route once per round
            ours = OUT / f"mtool-{layers}L-{args.outtype}.gguf"
            runs.setdefault("mtool convert (one pass)", []).append(
                timed([sys.executable, "-m", "mtool.cli", "convert", str(src), "-o", str(ours),
                       "--outtype", args.outtype, "-q"], output=ours))
            if conv is None:
                continue
            bf16 = OUT / f"llamacpp-{layers}L-bf16.gguf"
            theirs = OUT / f"llamacpp-{layers}L-{args.outtype}.gguf"
            env = dict(os.environ, PYTHONPATH=str(conv.parent / "gguf-py"))
            c = timed([sys.executable, str(conv), str(src), "--outfile", str(bf16), "--outtype", "bf16"], env,
                      output=bf16)
            extra = bf16.stat().st_size if bf16.exists() else 0
            req = OUT / f"mtool-requant-{layers}L-{args.outtype}.gguf"
            quantizers = {
                "  llama_model_quantize (bf16 GGUF)": [sys.executable, "-c", QUANTIZE, str(bf16), str(theirs),
                                                       args.outtype],
                "  mtool quantize (bf16 GGUF)": [sys.executable, "-m", "mtool.cli", "quantize", str(bf16), "-o",
                                                 str(req), "--outtype", args.outtype, "-q"]}
            outputs = {"  llama_model_quantize (bf16 GGUF)": theirs, "  mtool quantize (bf16 GGUF)": req}
            order = list(quantizers) if rnd % 2 == 0 else list(quantizers)[::-1]  # A B, then B A
            for route in order:
                os.sync()  # no earlier run's dirty pages written back during this one
                runs.setdefault(route, []).append(timed(quantizers[route], output=outputs[route]))
            q = runs["  llama_model_quantize (bf16 GGUF)"][-1]
            runs.setdefault("llama.cpp convert bf16 + quantize", []).append(
                (c[0] + q[0], max(c[1], q[1]), c[2] or q[2], c[3] + q[3]))
        shown = ["mtool convert (one pass)", "llama.cpp convert bf16 + quantize", "  llama_model_quantize (bf16 GGUF)",
                 "  mtool quantize (bf16 GGUF)"]
        for route, rs in sorted(runs.items(), key=lambda kv: shown.index(kv[0])):
            disk = extra if route.startswith("llama.cpp") else 0
            size_in = extra if route.startswith("  ") else nbytes
            rows.append((route, layers, size_in, rs, disk))
        if "  mtool quantize (bf16 GGUF)" in runs:
            med = {k: median(r[0] for r in v) for k, v in runs.items()}
            ratios.append((layers, med["llama.cpp convert bf16 + quantize"] / med["mtool convert (one pass)"],
                           med["  mtool quantize (bf16 GGUF)"] / med["  llama_model_quantize (bf16 GGUF)"]))
        if args.imatrix_tokens and size is not None and size == cases[0][0]:
            imatrix_rows.append(_imatrix_run(src, layers, args.imatrix_tokens, args.device))
        for f in OUT.glob("*.gguf"):
            f.unlink()
    print(f"\n{args.rounds} interleaved round(s); wall and CPU: median (min-max)")
    print(f"{'route':<34} {'layers':>6} {'input MB':>9} {'wall s':>20} {'CPU s':>20} {'peak RSS MB':>11} "
          f"{'extra disk MB':>13}")
    for tool, layers, nbytes, rs, extra in rows:
        status = "" if all(r[2] == 0 for r in rs) else "  FAILED"
        walls, cpus = [r[0] for r in rs], [r[3] for r in rs]
        wall = f"{median(walls):.2f} ({min(walls):.2f}-{max(walls):.2f})"
        cpu = f"{median(cpus):.1f} ({min(cpus):.1f}-{max(cpus):.1f})"
        print(f"{tool:<34} {layers:>6} {nbytes / 1e6:>9.0f} {wall:>20} {cpu:>20} {max(r[1] for r in rs) / 1e6:>11.0f} "
              f"{extra / 1e6:>13.0f}{status}")
    for layers, speedup, ratio in ratios:
        print(f"{layers} layers: one pass {speedup:.2f}x faster than llama.cpp's route (target >= 1.5x); "
              f"mtool quantize / llama_model_quantize {ratio:.2f}x (target <= 1.1x), by medians")
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
