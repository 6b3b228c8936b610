"""Benchmark: GPTQ's solve alone (one linear, given its Hessian) on the real layer shapes, with the
column loop launched op by op and replayed as CUDA graphs (`MTOOL_CUDA_GRAPHS`), on the GPU (and the
CPU for comparison). Prints seconds per linear, median of --repeat.

    python bench/bench_gptq_solve.py [--device cuda] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mtool.quantize.gptq import Hessian, gptq  # noqa: E402

# (out, in) of the linears of a 0.5B layer (hidden 1280, ffn 3456) and of Llama-2-7B's / Mixtral's layers
SHAPES = [(1280, 1280), (3456, 1280), (1280, 3456), (4096, 4096), (11008, 4096), (4096, 11008), (4096, 14336)]


def timed(w: torch.Tensor, h: Hessian, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    gptq(w, h, 4, 128, True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dev = args.device
    modes = ["0", "1"] if dev == "cuda" else ["0"]
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else f'{os.cpu_count()} CPU cores'}; "
          f"torch {torch.__version__}; GPTQ 4-bit g128 sym, 2048 tokens")
    print(f"{'out x in':>13} " + " ".join(f"{'graphs ' + m + ' s':>11}" for m in modes) + ("  speed-up" if len(modes) > 1 else ""))
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=g)
        h = Hessian(in_f, dev)
        h.add((torch.randn(2048, in_f, generator=g) * torch.rand(in_f, generator=g)).to(dev))
        res = {}
        for m in modes:
            os.environ["MTOOL_CUDA_GRAPHS"] = m
            timed(w, h, dev)  # warm-up (and the graph's capture)
            res[m] = statistics.median(timed(w, h, dev) for _ in range(args.repeat))
        line = f"{out_f:>6} x {in_f:<5} " + " ".join(f"{res[m]:>11.3f}" for m in modes)
        if len(modes) > 1:
            line += f"  {res['0'] / res['1']:>7.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
