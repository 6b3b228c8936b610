"""One artifact from its typed spec: the function `mtool convert` and `mtool release` both call.

`check_artifact` refuses, from shapes alone and before any work, every spec the model cannot
have (a type whose rows do not fit with --no-fallback, an I-quant without an importance matrix,
GPTQ dims that do not pack); `build_artifact` writes it atomically and says what it wrote.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .convert.gguf_export import export_gguf, plan_tensors
from .convert.gguf_write import GGUFResult, shard_paths
from .convert.gguf_types import OUTTYPES
from .convert.imatrix_file import ImportanceMatrix, importances_for
from .convert.quant_policy import MixtureOptions, parse_tensor_type, parse_type
from .errors import MtoolError, UsageError
from .model.canonical import CanonicalModel
from .model.checkpoint import parse_size
from .recipes.schema import ArtifactSpec, AwqOptions, GgufOptions, GptqOptions, Recipe

if TYPE_CHECKING:  # the GPTQ/AWQ and HF paths import torch: only when an artifact needs them
    from .quantize.engine import QuantSettings
    from .quantize.export import QuantReport


@dataclass
class BuildInputs:
    """What a build needs beyond the spec: the recipe's template and provenance, calibration text,
    the device, an importance matrix, and how to report."""

    recipe: Recipe | None = None
    calib: Path | None = None
    nsamples: int = 16
    seqlen: int = 128
    device: str = "cpu"  # resolved (cpu or cuda)
    imatrix: ImportanceMatrix | None = None
    gguf_name: str | None = None  # general.name (default: the source directory's name)
    force: bool = False
    progress: bool = True
    on_layer: Callable | None = None  # GPTQ/AWQ: called with each finished layer's report


@dataclass
class BuiltArtifact:
    """What a build wrote, for the CLI summary and the release manifest."""

    spec: ArtifactSpec
    files: list[Path]
    seconds: float
    n_params: int
    type_counts: dict[str, int] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    detail: GGUFResult | QuantReport | None = None

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight files (GGUF or safetensors), the numerator of bits per weight."""
        return sum(f.stat().st_size for f in _expand(self.files) if f.suffix in (".gguf", ".safetensors"))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / self.n_params if self.n_params else 0.0


def _expand(paths: list[Path]) -> list[Path]:
    """Files, with every directory among `paths` replaced by the files under it (sorted)."""
    return [f for p in paths for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))]


def artifact_path(out_dir: Path, prefix: str, spec: ArtifactSpec) -> Path:
    """Where a release writes `spec`: PREFIX-NAME.gguf, or a PREFIX-NAME directory."""
    return Path(out_dir) / (f"{prefix}-{spec.name}.gguf" if spec.to == "gguf" else f"{prefix}-{spec.name}")


def mixture_options(o: GgufOptions, imatrix: ImportanceMatrix | None, *, flags: bool = False) -> MixtureOptions:
    """The K-/I-quant options of a GGUF artifact; errors name the recipe keys, or with `flags` the
    command-line options (`--output-tensor-type`)."""
    def name(key: str) -> str:
        return "--" + key.replace("_", "-") if flags else key

    return MixtureOptions(
        overrides=tuple(parse_tensor_type(t) for t in o.tensor_types),
        output_type=parse_type(o.output_tensor_type, name("output_tensor_type")) if o.output_tensor_type else None,
        token_embedding_type=(parse_type(o.token_embedding_type, name("token_embedding_type"))
                              if o.token_embedding_type else None),
        allow_fallback=not o.no_fallback, imatrix=imatrix)


def quant_settings(spec: ArtifactSpec, device: str) -> QuantSettings:
    from .quantize.engine import QuantSettings

    o = spec.options
    sym = o.sym if isinstance(o, GptqOptions) else False  # AWQ is always asymmetric
    desc_act = o.desc_act if isinstance(o, GptqOptions) else False
    damp = o.damp if isinstance(o, GptqOptions) else 0.01
    return QuantSettings(spec.to, bits=o.bits, group_size=o.group_size, sym=sym, desc_act=desc_act, damp=damp,
                         device=device)


_HAS_IMATRIX = ImportanceMatrix({}, {})  # stands for "an importance matrix will be given" when planning


def check_artifact(model: CanonicalModel, spec: ArtifactSpec, *, imatrix: bool | None = None) -> None:
    """Refuse, before any work, an artifact `model` cannot have. `imatrix`: whether an importance
    matrix will be given (default: what the spec asks for)."""
    o = spec.options
    try:
        if isinstance(o, GgufOptions):
            if o.outtype not in OUTTYPES:
                raise UsageError(f"outtype {o.outtype!r} is not a GGUF type (choose from {', '.join(OUTTYPES)})")
            parse_size(o.split_max_size)
            has_im = o.imatrix if imatrix is None else imatrix
            if has_im and not OUTTYPES[o.outtype].mixture:
                raise UsageError(f"an importance matrix applies to K-/I-quant types, not {o.outtype}")
            planned, _ = plan_tensors(model, o.outtype, mixture_options(o, _HAS_IMATRIX if has_im else None))
            if not has_im and OUTTYPES[o.outtype].mixture:
                importances_for(None, {p.gguf_name: (p.shape, p.qtype) for p in planned}, o.outtype)
        elif isinstance(o, (GptqOptions, AwqOptions)):
            from .quantize.export import check_settings

            check_settings(model, quant_settings(spec, "cpu"), o.expert_naming)
        else:
            parse_size(o.split_max_size)
    except MtoolError as e:
        raise type(e)(f"artifact {spec.name} ({spec.label()}): {e}") from None


def build_artifact(model: CanonicalModel, spec: ArtifactSpec, out: Path, inputs: BuildInputs) -> BuiltArtifact:
    """Build `spec` from `model` at `out` (a .gguf path or a directory), atomically."""
    out = Path(out)
    o = spec.options
    t0 = time.perf_counter()
    if isinstance(o, GgufOptions):
        if o.imatrix and inputs.imatrix is None:
            raise UsageError(f"artifact {spec.name} asks for an importance matrix, but none was given")
        res = export_gguf(model, out, outtype=o.outtype, split_max_size=parse_size(o.split_max_size),
                          force=inputs.force, name=inputs.gguf_name, progress=inputs.progress, recipe=inputs.recipe,
                          mixture=mixture_options(o, inputs.imatrix if o.imatrix else None))
        return BuiltArtifact(spec, res.files, res.seconds, res.n_params, res.type_counts, res.fallbacks,
                             res.notes[len(model.notes):], res)
    if isinstance(o, (GptqOptions, AwqOptions)):
        from .quantize.export import export_quantized

        settings = quant_settings(spec, inputs.device)
        rep = export_quantized(model, out, settings, calib=inputs.calib, nsamples=inputs.nsamples,
                               seqlen=inputs.seqlen, force=inputs.force, progress=False,
                               expert_naming=o.expert_naming, on_layer=inputs.on_layer)
        return BuiltArtifact(spec, [rep.out], rep.seconds, model.n_params(), safetensors_types(rep.out), detail=rep)
    from .convert.hf_export import export_hf

    path = export_hf(model, out, force=inputs.force, max_shard_bytes=parse_size(o.split_max_size) or 5 * 1000**3,
                     progress=inputs.progress, recipe=inputs.recipe)
    return BuiltArtifact(spec, [path], time.perf_counter() - t0, model.n_params(), safetensors_types(path))


def safetensors_types(folder: Path) -> dict[str, int]:
    """Tensor count per dtype of a safetensors checkpoint (the manifest's type counts)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                dt = st.get_slice(k).get_dtype()
                counts[dt] = counts.get(dt, 0) + 1
    return counts


def output_files(out: Path, spec: ArtifactSpec) -> list[Path]:
    """The files an artifact at `out` consists of (split GGUF shards; every file of a directory)."""
    if spec.to == "gguf":
        shards = shard_paths(out)
        return shards or ([out] if out.exists() else [])
    return _expand([Path(out)]) if Path(out).is_dir() else []

