"""Benchmark: linear merge of three generated ~0.5B bf16 Llamas, mtool vs mergekit.

Wall time and peak RSS (process tree, sampled). mergekit is run from its own virtual
environment (bench/out/mk-venv, `pip install mergekit` with the CPU torch) when present;
pass --no-mergekit to skip it.

    python bench/bench_merge.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import OUT, make_model, run_measured  # noqa: E402

WEIGHTS = (0.5, 0.3, 0.2)


def mergekit_version(venv: Path) -> str | None:
    py = venv / "bin" / "python"
    if not py.is_file():
        return None
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=20, help="20 layers = ~0.5B parameters")
    ap.add_argument("--no-mergekit", action="store_true")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    srcs = [OUT / f"merge-src{i}-{args.layers}L" for i in range(3)]
    sizes = [make_model(p, args.layers, seed=i) for i, p in enumerate(srcs)]
    rows = []
    dst = OUT / "merged-mtool"
    wall, rss, code, _ = run_measured([sys.executable, "-m", "mtool.cli", "merge", *map(str, srcs), "-o", str(dst),
                                    "--weights", ",".join(map(str, WEIGHTS)), "--force", "-q"])
    rows.append(("mtool merge", wall, rss, code))
    shutil.rmtree(dst, ignore_errors=True)
    venv = OUT / "mk-venv"
    version = None if args.no_mergekit else mergekit_version(venv)
    if version:
        cfg = OUT / "mergekit.yaml"
        cfg.write_text("merge_method: linear\ndtype: bfloat16\nmodels:\n" + "".join(
            f"  - model: {p}\n    parameters:\n      weight: {w}\n" for p, w in zip(srcs, WEIGHTS)))
        dst = OUT / "merged-mergekit"
        wall, rss, code, _ = run_measured([str(venv / "bin" / "mergekit-yaml"), str(cfg), str(dst), "--allow-crimes",
                                        "--lazy-unpickle", "--out-shard-size", "5B"])
        rows.append((f"mergekit {version} (--lazy-unpickle)", wall, rss, code))
        shutil.rmtree(dst, ignore_errors=True)
    total = sum(sizes)
    print(f"\n3 x {sizes[0] / 1e6:.0f} MB bf16 models ({total / 1e6:.0f} MB in), linear merge, weights {WEIGHTS}")
    print(f"{'tool':<36} {'wall s':>7} {'MB/s in':>8} {'peak RSS MB':>11}")
    for tool, wall, rss, code in rows:
        print(f"{tool:<36} {wall:>7.2f} {total / 1e6 / wall:>8.0f} {rss / 1e6:>11.0f}{'' if code == 0 else '  FAILED'}")


if __name__ == "__main__":
    main()
