"""`mtool merge`: streaming, checked merges of checkpoints (Huozi 3.5 was a linear merge of three).

Tensor by tensor: each source's tensor is read, upcast to fp32, merged, cast to the output
dtype and written; peak memory is one tensor per source plus the result, whatever the
number or size of the models. Everything that can be checked is checked before any work:
method and weights, architectures, every tensor name and shape, tokenizers, output path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..convert.hf_export import hf_config
from ..errors import InputError, MtoolError, UsageError
from ..model.canonical import CanonicalModel, LazyTensor
from ..model.checkpoint import CheckpointReader, write_hf_checkpoint
from ..model.families import load_canonical
from ..model.tokenizer import native_tokenizer_config
from ..numerics import CHUNK_ELEMENTS, scan_values
from .methods import METHODS, NEEDS_BASE, merge_tensor

log = logging.getLogger("mtool")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# methods computed element by element, merged in row chunks of about this many elements
ELEMENTWISE = {"linear", "task_arithmetic", "dare_linear"}
REMOTE_CODE_SUFFIX = ".py"


@dataclass
class MergeSpec:
    """A merge, from CLI flags or a YAML config (same field names)."""

    sources: list[Path]
    method: str = "linear"
    weights: list[float] | None = None
    base: Path | None = None
    normalize: bool = True
    t: float = 0.5
    density: float = 0.5
    lam: float = 1.0
    seed: int = 0
    dtype: str | None = None
    tokenizer_source: Path | None = None
    layout: str = "canonical"  # canonical (the spec's HF names) | original (sources' own names)
    filters: list[dict] = field(default_factory=list)  # [{pattern, weights?, t?, density?}], first match wins


def _num(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"{where} must be finite, got {value!r}")
    return float(value)


def spec_from_yaml(path: Path) -> MergeSpec:
    """YAML (or JSON) form:  method, models: [{model, weight}], base, parameters: {normalize, t,
    density, lambda}, filters: [{pattern, weights, t, density}], dtype, seed, tokenizer_source,
    layout. Relative paths are relative to the config file. `mtool_merge.json` has this form."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"merge config {path} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"cannot read merge config {path}: {' '.join(str(e).split())[:200]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"merge config {path} must be a mapping of fields, not {type(data).__name__}")
    known = {"method", "models", "base", "parameters", "filters", "dtype", "seed", "tokenizer_source", "layout"}
    if set(data) - known:
        raise InputError(f"merge config {path}: unknown field {sorted(set(data) - known)[0]!r}")
    models = data.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("model"), str) for m in models):
        raise InputError(f"merge config {path}: 'models' must be a list of {{model: PATH, weight: W}}")
    root = Path(path).parent
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise InputError(f"merge config {path}: 'parameters' must be a mapping")
    weights = ([_num(m["weight"], f"merge config {path}: weight of {m['model']}") for m in models]
               if all("weight" in m for m in models) else None)
    filters = data.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, dict) for f in filters):
        raise InputError(f"merge config {path}: 'filters' must be a list of {{pattern, weights, t, density}}")

    def rel(p: str) -> Path:
        if not isinstance(p, str):
            raise InputError(f"merge config {path}: expected a path, got {p!r}")
        return (root / p).resolve() if not Path(p).is_absolute() else Path(p)

    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"merge config {path}: seed must be an integer, got {seed!r}")
    return MergeSpec(
        sources=[rel(m["model"]) for m in models],
        method=str(data.get("method", "linear")), weights=weights,
        base=rel(data["base"]) if data.get("base") else None,
        normalize=bool(params.get("normalize", True)),
        t=_num(params.get("t", 0.5), f"merge config {path}: parameters.t"),
        density=_num(params.get("density", 0.5), f"merge config {path}: parameters.density"),
        lam=_num(params.get("lambda", 1.0), f"merge config {path}: parameters.lambda"),
        seed=seed, dtype=data.get("dtype"),
        tokenizer_source=rel(data["tokenizer_source"]) if data.get("tokenizer_source") else None,
        layout=str(data.get("layout", "canonical")), filters=list(filters),
    )


def config_record(spec: MergeSpec) -> dict:
    """The merge as a config that `mtool merge --config` replays (absolute paths)."""
    rec: dict = {"method": spec.method,
                 "models": [{"model": str(Path(p).resolve()), **({"weight": w} if spec.weights else {})}
                            for p, w in zip(spec.sources, spec.weights or [None] * len(spec.sources))],
                 "parameters": {"normalize": spec.normalize, "t": spec.t, "density": spec.density, "lambda": spec.lam},
                 "seed": spec.seed, "layout": spec.layout}
    if spec.base is not None:
        rec["base"] = str(Path(spec.base).resolve())
    if spec.dtype is not None:
        rec["dtype"] = spec.dtype
    if spec.tokenizer_source is not None:
        rec["tokenizer_source"] = str(Path(spec.tokenizer_source).resolve())
    if spec.filters:
        rec["filters"] = spec.filters
    return rec


def _tokenizer_fingerprint(d: Path) -> str | None:
    """What the tokenizer maps text to: the SentencePiece model, or tokenizer.json's model + added tokens."""
    if (d / "tokenizer.model").is_file():
        return hashlib.sha256((d / "tokenizer.model").read_bytes()).hexdigest()
    if (d / "tokenizer.json").is_file():
        tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        key = json.dumps([tj.get("model"), tj.get("added_tokens"), tj.get("pre_tokenizer")], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()
    return None


@dataclass
class _Source:
    path: Path
    tensors: dict[str, LazyTensor]
    model: CanonicalModel | None
    reader: CheckpointReader | None


def _open(path: Path, layout: str) -> _Source:
    if layout == "canonical":
        m = load_canonical(path)
        return _Source(path, {t.name: t for t in m.tensors}, m, None)
    r = CheckpointReader(path)
    return _Source(path, {i.name: LazyTensor(i.name, i.shape, i.dtype, lambda n=i.name, r=r: r.load(n))
                          for i in r.iter_infos()}, None, r)


def _check(spec: MergeSpec) -> None:
    if spec.method not in METHODS:
        raise MtoolError(f"unknown merge method {spec.method!r} (choose from {', '.join(METHODS)})")
    if len(spec.sources) < 2:
        raise MtoolError("merge needs at least two sources")
    if spec.method == "slerp" and len(spec.sources) != 2:
        raise MtoolError(f"slerp merges exactly two models, got {len(spec.sources)}")
    if spec.method in NEEDS_BASE and spec.base is None:
        raise MtoolError(f"method {spec.method} needs --base (the model the task vectors are taken from)")
    if spec.weights is not None and len(spec.weights) != len(spec.sources):
        raise MtoolError(f"{len(spec.weights)} weights given for {len(spec.sources)} sources")
    if spec.weights is not None and spec.normalize and spec.method != "slerp" and sum(spec.weights) == 0:
        raise MtoolError("weights sum to zero and cannot be normalized (use --no-normalize)")
    if not 0.0 <= spec.t <= 1.0:
        raise MtoolError(f"slerp t must be within [0, 1], got {spec.t}")
    if not 0.0 < spec.density <= 1.0:
        raise MtoolError(f"density must be within (0, 1], got {spec.density}")
    if spec.layout not in ("canonical", "original"):
        raise MtoolError(f"layout must be canonical or original, got {spec.layout!r}")
    if spec.dtype is not None and spec.dtype not in DTYPES:
        raise MtoolError(f"unknown dtype {spec.dtype!r} (choose from {', '.join(DTYPES)})")
    for f in spec.filters:
        if not isinstance(f.get("pattern"), str):
            raise UsageError("every filter needs a 'pattern' (a regular expression on tensor names)")
        try:
            re.compile(f["pattern"])
        except re.error as e:
            raise UsageError(f"filter pattern {f['pattern']!r} is not a valid regular expression: {e}") from None
        unknown = set(f) - {"pattern", "weights", "t", "density"}
        if unknown:
            raise UsageError(f"filter {f['pattern']!r}: unknown field {sorted(unknown)[0]!r}")
        if "weights" in f:
            if not isinstance(f["weights"], list) or len(f["weights"]) != len(spec.sources):
                raise UsageError(f"filter {f['pattern']!r}: weights must be a list of {len(spec.sources)} numbers")
            for w in f["weights"]:
                _num(w, f"filter {f['pattern']!r}: weight")
        for key in ("t", "density"):
            if key in f:
                _num(f[key], f"filter {f['pattern']!r}: {key}")
    for w in spec.weights or []:
        _num(w, "weight")


def _compare(sources: list[_Source], layout: str) -> None:
    first = sources[0]
    if layout == "canonical":
        fam = {s.model.family for s in sources}
        if len(fam) > 1:
            raise MtoolError(f"sources are of different families: {', '.join(sorted(fam))}")
    for s in sources[1:]:
        for name, t in first.tensors.items():
            if name not in s.tensors:
                raise MtoolError(f"tensor {name} is in {first.path} but not in {s.path}")
            if s.tensors[name].shape != t.shape:
                raise MtoolError(f"tensor {name} has shape {list(t.shape)} in {first.path} "
                                 f"but {list(s.tensors[name].shape)} in {s.path}")
        extra = [n for n in s.tensors if n not in first.tensors]
        if extra:
            raise MtoolError(f"tensor {extra[0]} is in {s.path} but not in {first.path}")


def plan_merge(spec: MergeSpec) -> tuple[list[LazyTensor], dict, Path, list[str]]:
    """(merged lazy tensors, output config, tokenizer dir, notes), after every check."""
    _check(spec)
    paths = list(spec.sources) + ([spec.base] if spec.base is not None else [])
    for p in paths:
        if not Path(p).is_dir():
            raise InputError(f"source {p} is not a model directory")
    notes: list[str] = []
    resolved = [Path(p).resolve() for p in spec.sources]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            notes.append(f"{spec.sources[i]} is merged with itself (it appears more than once among the sources)")
        if spec.base is not None and p == Path(spec.base).resolve():
            notes.append(f"{spec.sources[i]} is also the base: its task vector is zero")
    if any(w < 0 for w in spec.weights or []):
        notes.append(f"negative weights {[w for w in spec.weights if w < 0]}: the merge subtracts those models")
    sources = [_open(Path(p), spec.layout) for p in spec.sources]
    base = _open(Path(spec.base), spec.layout) if spec.base is not None else None
    _compare(sources + ([base] if base else []), spec.layout)
    tok_dir = Path(spec.tokenizer_source) if spec.tokenizer_source else (base or sources[0]).path
    if spec.tokenizer_source is None:
        prints = {s.path: _tokenizer_fingerprint(s.path) for s in sources + ([base] if base else [])}
        if len(set(prints.values())) > 1:
            a, b = list(prints)[0], next(p for p in prints if prints[p] != prints[list(prints)[0]])
            raise MtoolError(f"tokenizers differ between {a} and {b}; pass --tokenizer-source to choose one")
    weights = spec.weights or [1.0] * len(sources)
    out_dtype = DTYPES[spec.dtype] if spec.dtype else None
    compiled = [(re.compile(f["pattern"]), f) for f in spec.filters]
    tensors = []
    for index, (name, t0) in enumerate(sources[0].tensors.items()):
        rule = next((f for rx, f in compiled if rx.search(name)), {})
        w = [float(x) for x in rule.get("weights", weights)]
        dtype = out_dtype or t0.dtype.torch
        if t0.synthetic and all(s.tensors[name].synthetic for s in sources):
            tensors.append(LazyTensor(name, t0.shape, dtype, lambda t0=t0, dtype=dtype: t0.load().to(dtype), synthetic=True))
            continue

        def load(name=name, w=w, rule=rule, dtype=dtype, index=index, shape=t0.shape) -> torch.Tensor:
            xs = [s.tensors[name].load() for s in sources]  # kept in the sources' dtype
            b = base.tensors[name].load() if base else None
            gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + index)
            kw = dict(normalize=spec.normalize, t=float(rule.get("t", spec.t)),
                      density=float(rule.get("density", spec.density)), lam=spec.lam, gen=gen)
            if spec.method in ELEMENTWISE:
                # row chunks: only a few MB of float32 temporaries, whatever the tensor size
                out = torch.empty(shape, dtype=dtype)
                cols = shape[-1] if shape else 1
                flat_out = out.view(-1, cols)
                flat_in = [x.reshape(-1, cols) for x in xs]
                flat_b = b.reshape(-1, cols) if b is not None else None
                step = max(1, CHUNK_ELEMENTS // cols)
                for r in range(0, flat_out.shape[0], step):
                    part = merge_tensor(spec.method, [x[r : r + step].to(torch.float32) for x in flat_in],
                                        flat_b[r : r + step].to(torch.float32) if flat_b is not None else None, w, **kw)
                    flat_out[r : r + step] = part.to(dtype)
            else:  # methods with per-tensor statistics (norms, magnitude ranks) see the whole tensor
                out = merge_tensor(spec.method, [x.to(torch.float32) for x in xs],
                                   b.to(torch.float32) if b is not None else None, w, **kw).to(dtype)
            del xs, b
            if not scan_values(out)[0]:
                raise MtoolError(f"merged tensor {name} has NaN or Inf values")
            return out

        tensors.append(LazyTensor(name, t0.shape, dtype, load))
    if spec.layout == "canonical":
        config = hf_config(sources[0].model)
        if out_dtype is not None:
            config["dtype"] = spec.dtype
    else:
        config = dict(sources[0].reader.config)
        if out_dtype is not None:
            config["torch_dtype"] = spec.dtype
    return tensors, config, tok_dir, notes


def run_merge(spec: MergeSpec, out: Path, *, force: bool = False, max_shard_bytes: int = 5 * 1000**3,
              progress: bool = True) -> Path:
    """Plan (with all checks), then stream the merge into an HF checkpoint at `out`."""
    tensors, config, tok_dir, notes = plan_merge(spec)
    for n in notes:
        log.warning(n)
    recipe = config_record(spec)
    tok_cfg = native_tokenizer_config(tok_dir) if spec.layout == "canonical" else None
    first = Path(spec.sources[0])
    extra = {p.name: p.read_bytes() for p in first.glob(f"*{REMOTE_CODE_SUFFIX}")} if spec.layout == "original" else {}
    readme = ("# Merged model\n\nMade with `mtool merge`. Replay with `mtool merge --config mtool_merge.json -o OUT`."
              " Recipe:\n\n```yaml\n" + yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True) + "```\n")
    extra["README.md"] = readme.encode()
    extra["mtool_merge.json"] = json.dumps(recipe, indent=2).encode()
    return write_hf_checkpoint(
        out, config, tensors, max_shard_bytes=max_shard_bytes, copy_from=tok_dir, tokenizer_config=tok_cfg,
        force=force, sources=tuple(Path(p) for p in spec.sources) + ((Path(spec.base),) if spec.base else ())
        + ((Path(spec.tokenizer_source),) if spec.tokenizer_source else ()),
        progress=progress, extra_files=extra, metadata={"mtool_merge": json.dumps(recipe)},
    )
