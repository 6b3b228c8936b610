"""`mtool demo`: the whole main job on a tiny built-in model, in well under a minute."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from .model.families import load_canonical
from .convert.gguf_export import export_gguf
from .tiny import TinySpec, make_tiny_llama
from .verify.report import VerifyReport, run_verify

DEMO_SPEC = TinySpec(tokenizer="spm", kv_heads=2, tied=False, layers=2, seed=0, train_steps=120)
DEMO_OUTTYPES = ("f16", "q8_0")


def run_demo(workdir: Path | None, echo: Callable[[str], None] = print) -> list[VerifyReport]:
    """Build a tiny Llama (GQA, untied, SentencePiece), convert it to GGUF and verify each file."""
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="mtool-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "tiny-llama"
    echo(f"1. building a tiny seeded Llama with a freshly trained SentencePiece tokenizer in {src}")
    make_tiny_llama(src, DEMO_SPEC)
    model = load_canonical(src)
    reports = []
    for i, outtype in enumerate(DEMO_OUTTYPES, start=2):
        out = workdir / f"tiny-llama-{outtype}.gguf"
        res = export_gguf(model, out, outtype=outtype, force=True, progress=False)
        echo(f"{i}. converted to {out.name} ({res.bytes_out / 1e6:.2f} MB, {res.seconds:.2f} s); verifying with llama.cpp")
        rep = run_verify(src, out, ctx=256, max_windows=4)
        echo(rep.table())
        echo("")
        reports.append(rep)
    echo(f"artifacts are in {workdir}")
    return reports
