"""Benchmark: HF -> GGUF conversion speed and peak memory, mtool vs llama.cpp's converter.

Generates bf16 Llama checkpoints (random weights, 3 shards, SentencePiece tokenizer trained
on the fly) of two sizes, converts each to f16 and q8_0 with `mtool convert` and with
llama.cpp's `convert_hf_to_gguf.py`, and prints wall time, input MB/s and peak RSS, beside the
physical floor measured in the same run (read the input files, write the output's number of bytes
sequentially: through the page cache with fsync, and with O_DIRECT; the faster of the two is the
floor), and each tool's time as a multiple of that floor. `--moe-layers N` adds a Mixtral with
real-size layers (hidden 4096, ffn 14336, 8 experts: ~2.8 GB of experts per layer, Huozi 3.5's
and Mixtral-8x7B's shape).

llama.cpp's converter is taken from the llama-cpp-python source distribution (downloaded
into bench/out/, never committed); pass --no-llamacpp to skip it.

    python bench/bench_convert.py            # ~0.5B and ~0.25B models
    python bench/bench_convert.py --sizes 0.5 --outtypes f16
    python bench/bench_convert.py --sizes 0.25,0.5,1 --outtypes f16,bf16,q8_0 --moe-layers 1
"""

from __future__ import annotations

import argparse
import json
import mmap
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


def write_random_shards(path: Path, shapes: dict[str, tuple[int, ...]], groups: list[list[str]], seed: int = 0) -> int:
    """Random bf16 tensors (N(0, 0.02)), one safetensors shard per group of names, and the index; returns bytes."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, part in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        sd = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in part}
        save_file(sd, str(path / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in sd.values())
        weight_map.update({n: fname for n in part})
        del sd
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def make_model(path: Path, layers: int, seed: int = 0) -> int:
    """Write a random bf16 Llama with `layers` layers in 3 safetensors shards; returns bytes."""
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
    total = write_random_shards(path, shapes, [names[k * len(names) // 3 : (k + 1) * len(names) // 3] for k in range(3)],
                                seed)
    cfg.save_pretrained(str(path))
    train_spm_tokenizer(path, 700)
    return total


MOE = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=32000, experts=8)


def make_moe_model(path: Path, layers: int, seed: int = 0) -> int:
    """A random bf16 Mixtral with real-size layers, one shard per ~1 GB; returns bytes."""
    from transformers import MixtralConfig

    from mtool.tiny import train_spm_tokenizer

    if (path / "config.json").is_file():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    path.mkdir(parents=True, exist_ok=True)
    h, f, v, e = MOE["hidden"], MOE["intermediate"], MOE["vocab"], MOE["experts"]
    hd, kv = h // MOE["heads"], MOE["kv_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv * hd, h),
            f"{p}.self_attn.v_proj.weight": (kv * hd, h), f"{p}.self_attn.o_proj.weight": (h, h),
            f"{p}.block_sparse_moe.gate.weight": (e, h),
        })
        for x in range(e):
            for w in ("w1", "w2", "w3"):
                shapes[f"{p}.block_sparse_moe.experts.{x}.{w}.weight"] = (f, h) if w != "w2" else (h, f)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    groups, cur, size = [], [], 0
    for n, shp in shapes.items():
        nbytes = 2 * torch.Size(shp).numel()
        if cur and size + nbytes > 10**9:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nbytes
    groups.append(cur)
    total = write_random_shards(path, shapes, groups, seed)
    cfg = MixtralConfig(vocab_size=v, hidden_size=h, intermediate_size=f, num_hidden_layers=layers,
                        num_attention_heads=MOE["heads"], num_key_value_heads=kv, num_local_experts=e,
                        num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=False,
                        dtype="bfloat16")
    cfg.architectures = ["MixtralForCausalLM"]
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


def floor_seconds(src: Path, out_bytes: int, dst: Path, direct: bool) -> float:
    """The physical floor of a conversion: read every input file once and write `out_bytes` sequentially
    in 16 MiB chunks, in this process (same page-cache state as the conversions, which read the
    just-written model from the cache too). `direct`: O_DIRECT writes from an aligned buffer (the last
    block padded, the file cut back), else through the page cache; fsync'd either way."""
    chunk = 16 * 2**20
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in sorted(src.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(view):
                    pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(dst, flags, 0o644)
    try:
        pos = 0
        while pos < out_bytes:
            n = min(chunk, out_bytes - pos)
            if direct:
                n = -(-n // 4096) * 4096
            pos += os.write(fd, view[:n])
        if direct:
            os.ftruncate(fd, out_bytes)
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    dst.unlink()
    view.release()
    buf.close()
    return wall


def repeat(n: int, cmd: list[str], env: dict | None = None, output: Path | None = None) -> tuple[float, int, int]:
    """Median wall time, max peak RSS and worst exit code over n runs. `output` is removed (and the
    removal synced) before each run: freeing the previous run's file is not part of a conversion
    (on this VM's ext4, mounted with online discard, replacing a 1.5 GB file cost a run ~0.3 s),
    and the floor does not pay it either."""
    runs = []
    for _ in range(n):
        if output is not None and output.exists():
            output.unlink()
            os.sync()
        runs.append(run_measured(cmd, env)[:3])
    walls = sorted(r[0] for r in runs)
    return walls[len(walls) // 2], max(r[1] for r in runs), max(r[2] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5,0.25", help="model sizes in B params (0.5 = 20 layers)")
    ap.add_argument("--outtypes", default="f16,q8_0")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs per cell; the median wall time is reported")
    ap.add_argument("--moe-layers", type=int, default=0, help="also convert a real-size Mixtral of N layers")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    conv = None if args.no_llamacpp else llamacpp_converter()
    mtool = [sys.executable, "-m", "mtool.cli", "convert"]
    rows = []
    cases = []
    for size in [float(s) for s in args.sizes.split(",") if s]:
        layers = max(1, round(20 * size / 0.5))
        cases.append((layers, OUT / f"llama-{layers}L-bf16", make_model))
    if args.moe_layers:
        cases.append((args.moe_layers, OUT / f"mixtral-4096h-{args.moe_layers}L-bf16", make_moe_model))
    for layers, src, make in cases:
        nbytes = make(src, layers)
        for outtype in args.outtypes.split(","):
            dst = OUT / f"mtool-{layers}L-{outtype}.gguf"
            wall, rss, code = repeat(args.repeat, mtool + [str(src), "-o", str(dst), "--outtype", outtype, "-q"],
                                     output=dst)
            out_bytes = dst.stat().st_size if dst.is_file() else 0
            med = args.repeat // 2
            cached = sorted(floor_seconds(src, out_bytes, OUT / "floor.bin", False) for _ in range(args.repeat))[med]
            direct = sorted(floor_seconds(src, out_bytes, OUT / "floor.bin", True) for _ in range(args.repeat))[med]
            floor = min(cached, direct)
            rows.append(("floor: read + write, page cache, fsync", layers, nbytes, outtype, cached, 0, 0, floor))
            rows.append(("floor: read + write, O_DIRECT", layers, nbytes, outtype, direct, 0, 0, floor))
            rows.append(("mtool", layers, nbytes, outtype, wall, rss, code, floor))
            if conv is not None:
                dst = OUT / f"llamacpp-{layers}L-{outtype}.gguf"
                env = dict(os.environ, PYTHONPATH=str(conv.parent / "gguf-py"))
                wall, rss, code = repeat(args.repeat, [sys.executable, str(conv), str(src), "--outfile", str(dst),
                                                       "--outtype", outtype], env, output=dst)
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
