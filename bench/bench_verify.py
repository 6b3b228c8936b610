"""Benchmark: `mtool verify` memory and time, whole-model reference vs layer-streamed reference.

A generated bf16 Llama of ~1.1B parameters (hidden 2048, ffn 5632, 22 layers, 32 heads / 4 kv heads, 32000
vocab; TinyLlama's shape) is converted to q8_0 with mtool, then verified against it twice in separate
processes: `--reference whole` (transformers, the model in float32) and `--reference streamed` (one decoder
layer at a time). Prints wall time and peak RSS of each whole verify process (reference side plus the
llama.cpp side, which maps the q8_0 file) and the size of that mapping, and the peak RSS of the streamed
reference alone (same windows, no candidate) in a third process. The model is random, so its predictions
are nearly flat and top-1 agreement fails the q8_0 threshold (verdict FAIL, exit 1); the figures here are
memory and time.

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


def reference_only(src: Path, windows: int, ctx: int) -> None:
    """The streamed reference over verify's windows, nothing else (run in its own process)."""
    from mtool.cli import _setup_process
    from mtool.data import builtin_text
    from mtool.model.families import load_canonical
    from mtool.verify.data import token_windows
    from mtool.verify.reftok import ReferenceTokenizer
    from mtool.verify.streamed import StreamedRunner

    _setup_process()
    tok = ReferenceTokenizer.open(src)
    ids = tok.encode(builtin_text())
    for _ in StreamedRunner(load_canonical(src), "cpu").iter_logits(token_windows(ids, ctx, windows, tok.bos_id)):
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--reference-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.reference_only:
        return reference_only(args.reference_only, args.windows, args.ctx)
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
        verdict = (out.strip().splitlines() or ["?"])[-1][:60]
        rows.append((f"verify, reference {mode}", wall, rss, code, kld, positions, verdict))
    wall, rss, code, _ = run_measured([sys.executable, __file__, "--reference-only", str(src), "--windows",
                                       str(args.windows), "--ctx", str(args.ctx)])
    rows.append(("streamed reference alone", wall, rss, code, "", "", ""))
    n_params = nbytes // 2
    print(f"\nmodel: {n_params / 1e9:.2f}B parameters, bf16 {nbytes / 2**30:.2f} GiB (float32 {2 * nbytes / 2**30:.2f} GiB); "
          f"candidate q8_0 GGUF {cand.stat().st_size / 2**30:.2f} GiB (the llama.cpp side maps it)")
    print(f"{'process':<27} {'wall s':>7} {'peak RSS GiB':>12} {'positions':>9} {'mean KLD':>10}  verdict (exit)")
    for what, wall, rss, code, kld, positions, verdict in rows:
        print(f"{what:<27} {wall:>7.1f} {rss / 2**30:>12.2f} {positions:>9} {kld:>10}  {verdict} ({code})")


if __name__ == "__main__":
    main()
