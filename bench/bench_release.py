"""Benchmark: `mtool release build` of four artifacts vs the same artifacts made by separate commands.

The ~0.5B bf16 model of the conversion benchmark (20 layers, hidden 1280, ffn 3456, 32000 vocab) and
four artifacts: q8_0 GGUF, q4_k_m GGUF with an importance matrix, GPTQ 4-bit g128, normalized HF. The
separate way is what a release script does today: `mtool imatrix`, four `mtool convert`, four `mtool
verify` (each verify runs the reference model again and reads the source again). The release reads
the source once for its checks and hashes, runs the reference once (cached logits) and also writes
the manifest, SHA256SUMS and the model card. Same calibration (16 x 128 tokens) and verify windows
(4 x 256 tokens) for both. A second `release build` (nothing to do) is timed too. The model is random,
so 4-bit verdicts may FAIL (exit 1); the figures are time and memory.

    python bench/bench_release.py [--layers 20]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import OUT, make_model, run_measured  # noqa: E402

CAL = ["--nsamples", "16", "--seqlen", "128"]
EV = ["--ctx", "256", "--max-windows", "4"]
RECIPE = """name: bench
family: llama
calibration: {nsamples: 16, seqlen: 128}
evaluation: {ctx: 256, max_windows: 4}
artifacts:
  - {name: q8_0, to: gguf, outtype: q8_0}
  - {name: q4_k_m, to: gguf, outtype: q4_k_m, imatrix: true}
  - {name: gptq-4bit, to: gptq, bits: 4, group_size: 128}
  - {name: hf, to: hf}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=20)
    args = ap.parse_args()
    src = OUT / f"llama-{args.layers}L-bf16"
    make_model(src, args.layers)
    work = OUT / "release-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    mt = [sys.executable, "-m", "mtool.cli"]
    im = work / "sep-imatrix.gguf"
    steps = [
        ("imatrix", mt + ["imatrix", str(src), "-o", str(im), "--device", "cpu", "-q", *CAL]),
        ("convert q8_0", mt + ["convert", str(src), "-o", str(work / "sep-q8_0.gguf"), "--outtype", "q8_0", "-q"]),
        ("convert q4_k_m", mt + ["convert", str(src), "-o", str(work / "sep-q4_k_m.gguf"), "--outtype", "q4_k_m",
                                 "--imatrix", str(im), "-q"]),
        ("convert gptq-4bit", mt + ["convert", str(src), "-o", str(work / "sep-gptq"), "--to", "gptq", "--device", "cpu",
                                    "-q", *CAL]),
        ("convert hf", mt + ["convert", str(src), "-o", str(work / "sep-hf"), "--to", "hf", "-q"]),
    ]
    for name in ("q8_0.gguf", "q4_k_m.gguf", "gptq", "hf"):
        steps.append((f"verify {name.removesuffix('.gguf')}",
                      mt + ["verify", str(src), str(work / f"sep-{name}"), "--device", "cpu", "-q", *EV]))
    rows = []
    for what, cmd in steps:
        wall, rss, code, _ = run_measured(cmd)
        rows.append(("separate: " + what, wall, rss, code))
    (work / "recipe.yaml").write_text(RECIPE)
    rel = mt + ["release", "build", str(src), "-r", str(work / "recipe.yaml"), "-o", str(work / "release"),
                "--device", "cpu", "-q"]
    wall, rss, code, out = run_measured(rel)
    rows.append(("release build", wall, rss, code))
    wall2, rss2, code2, _ = run_measured(rel)
    rows.append(("release build again (no-op)", wall2, rss2, code2))
    sep = [r for r in rows if r[0].startswith("separate")]
    total = sum(r[1] for r in sep)
    print(out)
    print(f"{'step':<32} {'wall s':>8} {'peak RSS GiB':>12}  exit")
    for what, w, r, c in rows:
        print(f"{what:<32} {w:>8.1f} {r / 2**30:>12.2f}  {c}")
    print(f"{'separate, sum':<32} {total:>8.1f} {max(r[2] for r in sep) / 2**30:>12.2f}")
    print(f"release / separate: {wall / total:.2f}x the time")


if __name__ == "__main__":
    main()
