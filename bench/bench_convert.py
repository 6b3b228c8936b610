"""Benchmark: HF -> GGUF conversion speed and peak memory, mtool vs llama.cpp's converter.

Generates bf16 Llama checkpoints (random weights, 3 shards, SentencePiece tokenizer trained
on the fly) of two sizes, converts each to f16 and q8_0 with `mtool convert` and with
llama.cpp's `convert_hf_to_gguf.py`, and prints wall time, input MB/s and peak RSS, beside the
physical floor measured in the same run (read the input files, write the output's number of bytes
sequentially with fsync), and each tool's time as a multiple of that floor.

llama.cpp's converter is taken from the llama-cpp-python source distribution (downloaded
into bench/out/, never committed); pass --no-llamacpp to skip it.

    python bench/bench_convert.py            # ~0.5B and ~0.25B models
    python bench/bench_convert.py --sizes 0.5 --outtypes f16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
LLAMA_CPP_PY_VERSION = "0.3.36"

# ~0.5B parameters: 20 layers of hidden 1280 / ffn 3456 plus a 32000-row untied vocab
BASE = dict(hidden=1280, intermediate=3456, heads=20, kv_heads=4, vocab=32000)


def make_model(path: Path, layers: int, seed: int = 0) -> int:
    """Write a random bf16 Llama with `layers` layers in 3 safetensors shards; returns bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from mtool.tiny import train_spm_tokenizer

    if (path / "config.json").is_file():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    path.mkdir(parents=True, exist_ok=True)
    h, f, v = BASE["hidden"], BASE["intermediate"], BASE["vocab"]
    hd = h // BASE["heads"]
    cfg = LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=f, num_hidden_layers=layers,
                      num_attention_heads=BASE["heads"], num_key_value_heads=BASE["kv_heads"],
                      max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (BASE["kv_heads"] * hd, h),
            f"{p}.self_attn.v_proj.weight": (BASE["kv_heads"] * hd, h), f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h), f"{p}.mlp.down_proj.weight": (h, f),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    names = list(shapes)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k in range(3):
        part = names[k * len(names) // 3 : (k + 1) * len(names) // 3]
        fname = f"model-{k + 1:05d}-of-00003.safetensors"
        sd = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in part}
        save_file(sd, str(path / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in sd.values())
        weight_map.update({n: fname for n in part})
        del sd
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg.save_pretrained(str(path))
    train_spm_tokenizer(path, 700)
    return total


def llamacpp_converter() -> Path | None:
    """convert_hf_to_gguf.py from the llama-cpp-python sdist (downloaded once into bench/out)."""
    root = OUT / f"llama_cpp_python-{LLAMA_CPP_PY_VERSION}"
    script = root / "vendor/llama.cpp/convert_hf_to_gguf.py"
    if script.is_file():
        return script
    dl = OUT / "sdist"
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        f"llama-cpp-python=={LLAMA_CPP_PY_VERSION}", "-d", str(dl)], capture_output=True, text=True)
    tars = list(dl.glob("*.tar.gz"))
    if r.returncode or not tars:
        print("could not download the llama-cpp-python sdist:", r.stderr[-300:], file=sys.stderr)
        return None
    with tarfile.open(tars[0]) as t:
        t.extractall(OUT, filter="data")
    return script if script.is_file() else None


def _vm_hwm(pid: int) -> int:
    """Peak resident set of a live process, in bytes; 0 once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes, exit code, stdout) of one child process and its children.

    The child's own peak is its VmHWM (the kernel's high-water mark), read from /proc every 20 ms
    (cheap: one small file) until it exits; ru_maxrss cannot be used because Linux keeps the
    forking parent's peak across fork+exec. Grandchildren (a tool that spawns workers) are summed
    by sampling every 0.5 s: the 5 ms psutil scan of every process used before took enough CPU
    from a 2-core machine to slow BLAS-bound children by a fifth.
    """
    import tempfile

    import psutil

    err_file, out_file = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out_file, stderr=err_file)
    ps, peak, tick = psutil.Process(proc.pid), 0, 0
    while proc.poll() is None:
        peak = max(peak, _vm_hwm(proc.pid))
        tick += 1
        if tick % 25 == 0:
            try:
                kids = ps.children(recursive=True)
                if kids:
                    peak = max(peak, ps.memory_info().rss + sum(c.memory_info().rss for c in kids))
            except psutil.Error:
                pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
    code = proc.returncode
    usage_peak = peak
    out_file.seek(0)
    out = out_file.read().decode(errors="replace")
    if code:
        print(f"command failed ({code}): {' '.join(cmd)}\n{err[-800:]}", file=sys.stderr)
    return wall, usage_peak, code, out


def floor_seconds(src: Path, out_bytes: int, dst: Path) -> float:
    """The physical floor of a conversion: read every input file once and write `out_bytes` sequentially
    with fsync, in 16 MiB chunks, in this process (same page-cache state as the conversions, which read
    the just-written model from the cache too)."""
    chunk = 16 * 2**20
    buf = bytearray(chunk)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in sorted(src.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = out_bytes
        while left > 0:
            left -= os.write(fd, view[: min(chunk, left)])
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    dst.unlink()
    return wall


def repeat(n: int, cmd: list[str], env: dict | None = None) -> tuple[float, int, int]:
    """Median wall time, max peak RSS and worst exit code over n runs."""
    runs = [run_measured(cmd, env)[:3] for _ in range(n)]
    walls = sorted(r[0] for r in runs)
    return walls[len(walls) // 2], max(r[1] for r in runs), max(r[2] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,0.25", help="model sizes in B params (0.5 = 20 layers)")
    ap.add_argument("--outtypes", default="f16,q8_0")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the median wall time is reported")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    conv = None if args.no_llamacpp else llamacpp_converter()
    mtool = [sys.executable, "-m", "mtool.cli", "convert"]
    rows = []
    for size in [float(s) for s in args.sizes.split(",")]:
        layers = max(1, round(20 * size / 0.5))
        src = OUT / f"llama-{layers}L-bf16"
        nbytes = make_model(src, layers)
        for outtype in args.outtypes.split(","):
            dst = OUT / f"mtool-{layers}L-{outtype}.gguf"
            wall, rss, code = repeat(args.repeat, mtool + [str(src), "-o", str(dst), "--outtype", outtype, "--force", "-q"])
            out_bytes = dst.stat().st_size if dst.is_file() else 0
            floor = sorted(floor_seconds(src, out_bytes, OUT / "floor.bin") for _ in range(args.repeat))[args.repeat // 2]
            rows.append(("floor: read input + write output, fsync", layers, nbytes, outtype, floor, 0, 0, floor))
            rows.append(("mtool", layers, nbytes, outtype, wall, rss, code, floor))
            if conv is not None:
                dst = OUT / f"llamacpp-{layers}L-{outtype}.gguf"
                env = dict(os.environ, PYTHONPATH=str(conv.parent / "gguf-py"))
                wall, rss, code = repeat(args.repeat, [sys.executable, str(conv), str(src), "--outfile", str(dst),
                                                       "--outtype", outtype], env)
                rows.append(("llama.cpp convert_hf_to_gguf.py", layers, nbytes, outtype, wall, rss, code, floor))
            for f in OUT.glob("*.gguf"):
                f.unlink()
    print(f"\n{'tool':<40} {'layers':>6} {'input MB':>9} {'outtype':>7} {'wall s':>7} {'MB/s':>6} {'x floor':>7} "
          f"{'peak RSS MB':>11}")
    for tool, layers, nbytes, outtype, wall, rss, code, floor in rows:
        status = "" if code == 0 else "  FAILED"
        print(f"{tool:<40} {layers:>6} {nbytes / 1e6:>9.0f} {outtype:>7} {wall:>7.2f} {nbytes / 1e6 / wall:>6.0f} "
              f"{wall / floor:>7.2f} {rss / 1e6 if rss else float('nan'):>11.0f}{status}")


if __name__ == "__main__":
    main()
