#!/bin/bash
# Profiles `convert --to gptq --device cuda` (cProfile) on the real-size Mixtral layer and a 2-layer
# 7B-shaped stack; the .prof files and the top of each go to $OUT (the device tool's folder) or ./prof.
set -e
out=${OUT:-prof}; mkdir -p "$out"
python3 - <<'PY'
import sys; sys.path[:0] = ["bench", "."]
import bench_convert
from bench_convert import OUT, make_moe_model, make_model
from mtool.data import builtin_text
OUT.mkdir(parents=True, exist_ok=True)
(OUT / "calib-gpu.txt").write_text("\n".join([builtin_text()] * 120), encoding="utf-8")
make_moe_model(OUT / "prof-moe", 1)
bench_convert.BASE.update(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
make_model(OUT / "prof-7b", 2)
PY
for m in moe:128:512 7b:128:2048; do
  IFS=: read tag n s <<<"$m"
  python3 -m cProfile -o "$out/$tag.prof" -m mtool.cli convert bench/out/prof-$tag -o /tmp/prof-$tag-gptq --to gptq \
    --bits 4 --group-size 128 --calib bench/out/calib-gpu.txt --nsamples $n --seqlen $s --device cuda --force -q
  python3 -c "import pstats; p = pstats.Stats('$out/$tag.prof'); p.sort_stats('tottime').print_stats(25); p.sort_stats('cumtime').print_stats(40)" > "$out/$tag.txt"
  head -60 "$out/$tag.txt" | cut -c1-150
done
