"""Benchmark: `mtool verify` memory and time, whole-model reference vs layer-streamed reference.

A generated bf16 Llama of ~1.1B parameters (hidden 2048, ffn 5632, 22 layers, 32 heads / 4 kv heads, 32000
vocab; TinyLlama's shape) is converted to q8_0 with mtool, then verified against it twice in separate
processes: `--reference whole` (transformers, the model in float32) and `--reference streamed` (one decoder
layer at a time). Prints wall time and peak RSS of each whole verify process (reference side plus the
llama.cpp side, which maps the q8_0 file) and the size of that mapping.

    python bench/bench_verify.py [--layers 22] [--windows 4] [--ctx 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_convert  # noqa: E402
from bench_convert import OUT, make_model, run_measured  # noqa: E402

SHAPE = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    bench_convert.BASE.update(SHAPE)
    src = OUT / f"llama-{SHAPE['hidden']}h-{args.layers}L-bf16"
    nbytes = make_model(src, args.layers)
    cand = OUT / f"{src.name}-q8_0.gguf"
    if not cand.is_file():
        run_measured([sys.executable, "-m", "mtool.cli", "convert", str(src), "-o", str(cand), "--outtype", "q8_0", "-q"])
    rows = []
    for mode in ("streamed", "whole"):
        wall, rss, code, out = run_measured([sys.executable, "-m", "mtool.cli", "verify", str(src), str(cand),
                                             "--reference", mode, "--ctx", str(args.ctx), "--max-windows",
                                             str(args.windows), "--device", "cpu", "-q"])
        kld = next((line.split()[2] for line in out.splitlines() if line.startswith("mean KLD")), "?")
        positions = next((line.split()[1] for line in out.splitlines() if line.startswith("positions")), "?")
        rows.append((mode, wall, rss, code, kld, positions))
    n_params = nbytes // 2
    print(f"\nmodel: {n_params / 1e9:.2f}B parameters, bf16 {nbytes / 2**30:.2f} GiB (float32 {2 * nbytes / 2**30:.2f} GiB); "
          f"candidate q8_0 GGUF {cand.stat().st_size / 2**30:.2f} GiB (the llama.cpp side maps it)")
    print(f"{'reference':<10} {'wall s':>7} {'peak RSS GiB':>12} {'positions':>9} {'mean KLD':>10}")
    for mode, wall, rss, code, kld, positions in rows:
        print(f"{mode:<10} {wall:>7.1f} {rss / 2**30:>12.2f} {positions:>9} {kld:>10}{'' if code == 0 else '  FAILED'}")


if __name__ == "__main__":
    main()
