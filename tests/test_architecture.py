"""The package's shape: dependencies point one way, no import cycles, internal imports at the top of
modules, no architecture literals in the writers and engines (they read the ArchSpec), and library
calls leave process-wide state as they found it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1] / "mtool"
# model <- convert/quantize/merge/vocab <- verify/artifacts <- release <- cli; the ground floor is shared helpers
LAYER = {
    "errors": 0, "outputs": 0, "numerics": 0, "device": 0, "gguf_file": 0, "ggml": 0, "memory": 0, "data": 0,
    "recipes": 0, "__init__": 0, "dtypes": 0, "direct_write": 0, "buffers": 0,
    "model": 1,
    "convert": 2, "quantize": 2, "merge": 2, "vocab": 2,
    "verify": 3, "artifacts": 3,
    "release": 4,
    "cli": 5, "demo": 5, "inspect": 5, "tiny": 5, "__main__": 5,
}
# modules that may import inside functions: the CLI's commands pull in torch, and `mtool --help` must
# stay fast; artifacts builds GGUF files without torch and imports the GPTQ/AWQ/HF writers when used
LOCAL_IMPORTS_ALLOWED = {"mtool.cli", "mtool.artifacts"}
# writers and engines name no architecture: they read model.spec
SPEC_READERS = ("convert/gguf_export.py", "convert/hf_export.py", "convert/gguf_requantize.py", "quantize",
                "merge", "verify", "vocab")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported mtool module, at module level) for every internal import of a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                targets.append(sub if sub in MODULES else mod)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t == "mtool" or t.startswith("mtool."):
                out.append((t, id(node) in top))
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYER[parts[1]] if len(parts) > 1 else 0


def test_every_module_has_a_layer():
    assert all(m.split(".")[1] in LAYER for m in MODULES if m != "mtool")


def test_dependencies_point_down():
    bad = [f"{m} -> {t}" for m, deps in GRAPH.items() for t, _ in deps if _layer(t) > _layer(m)]
    assert not bad, bad


def test_internal_imports_at_module_top():
    bad = [f"{m} -> {t}" for m, deps in GRAPH.items() for t, top in deps if not top and m not in LOCAL_IMPORTS_ALLOWED]
    assert not bad, bad


def test_no_import_cycles():
    edges = {m: {t for t, _ in deps if t in MODULES and t != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_cycle_detector_sees_a_cycle(monkeypatch):
    """The check above can fail: a made-up back edge is reported."""
    monkeypatch.setitem(GRAPH, "mtool.model.canonical", GRAPH["mtool.model.canonical"] + [("mtool.model.families", True)])
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycles()


def _spec_reader_files() -> list[Path]:
    files = []
    for entry in SPEC_READERS:
        p = ROOT / entry
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return files


ARCH_LITERAL = re.compile(r"\b(llama|mixtral|qwen2)\b(?![.-]cpp)|\b(Llama|Mixtral|Qwen2)[A-Z]\w*|block_sparse_moe|"
                          r"\.(gate|up|down)_proj\b")


def _literals(tree: ast.AST) -> list[str]:
    """String constants that are not docstrings."""
    docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


@pytest.mark.parametrize("path", _spec_reader_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_architecture_literals_in_writers_and_engines(path):
    found = [s for s in _literals(ast.parse(path.read_text())) if ARCH_LITERAL.search(s)]
    assert not found, found


def test_architecture_literal_check_can_fail():
    tree = ast.parse('"""Docstrings may say LlamaForCausalLM."""\nx = "model.layers.0.mlp.gate_proj"\ny = "llama"\n')
    assert [s for s in _literals(tree) if ARCH_LITERAL.search(s)] == ["model.layers.0.mlp.gate_proj", "llama"]


def test_export_restores_torch_threads(tiny_models, tmp_path):
    from mtool.convert.gguf_export import export_gguf
    from mtool.model.families import load_canonical

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        export_gguf(load_canonical(tiny_models["gqa_untied_spm"]), tmp_path / "a.gguf", outtype="q8_0", progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
