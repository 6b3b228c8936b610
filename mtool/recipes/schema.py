"""Typed recipes: a YAML recipe validated into dataclasses, every error naming the key at fault.

The dataclasses are the schema: a field's type hint is the type a key must have, its default the
value an absent key takes, `choices` in its metadata the values it may take. One small validator
(`from_mapping`) reads them, so a new artifact setting is one field, not new parsing code.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

FORMATS = ("gguf", "hf", "gptq", "awq")
IMATRIX_ARTIFACT = "imatrix"  # the name of the importance matrix a release computes (reserved)
FAMILY_ALIASES = {"telechat52b": "telechat"}  # adapter family names a recipe may name
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _choices(*values) -> dict:
    return {"choices": values}


@dataclass(frozen=True)
class Provenance:
    """Where the model comes from and who made the artifacts (model card, GGUF general.* keys)."""

    base_model: str | None = None  # Hub id of the source model, e.g. HIT-SCIR/huozi3.5
    license: str | None = None
    languages: tuple[str, ...] = ()
    quantized_by: str | None = None
    source_url: str | None = None  # default: https://huggingface.co/<base_model>
    tags: tuple[str, ...] = ()

    @property
    def url(self) -> str | None:
        if self.source_url:
            return self.source_url
        return f"https://huggingface.co/{self.base_model}" if self.base_model else None


@dataclass(frozen=True)
class Calibration:
    """Text the GPTQ/AWQ artifacts and the importance matrix are calibrated on."""

    file: str | None = None  # relative to the recipe file; None: mtool's built-in sample
    nsamples: int = 16
    seqlen: int = 128


@dataclass(frozen=True)
class Evaluation:
    """The token windows every artifact is verified on (the same windows for all of them)."""

    data: str | None = None  # relative to the recipe file; None: the built-in sample
    ctx: int = 512
    max_windows: int = 8


@dataclass(frozen=True)
class Ollama:
    """An Ollama prompt template: a Modelfile is written beside each GGUF artifact."""

    template: str
    stop: tuple[str, ...] = ()
    system: str | None = None


@dataclass(frozen=True)
class VerifySpec:
    """Thresholds of one artifact's verification; None: the default of its type."""

    max_kld: float | None = None
    min_top1: float | None = None
    max_ppl_ratio: float | None = None

    def overrides(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class GgufOptions:
    outtype: str = "f16"
    split_max_size: str | None = None
    imatrix: bool = False  # quantize with the release's importance matrix
    tensor_types: tuple[str, ...] = ()  # REGEX=TYPE, as llama-quantize's --tensor-type
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    no_fallback: bool = False


@dataclass(frozen=True)
class HfOptions:
    split_max_size: str | None = None


@dataclass(frozen=True)
class GptqOptions:
    bits: int = field(default=4, metadata=_choices(2, 3, 4, 8))
    group_size: int = field(default=128, metadata=_choices(-1, 32, 64, 128))
    sym: bool = True
    desc_act: bool = False
    damp: float = 0.01
    expert_naming: str = field(default="legacy", metadata=_choices("legacy", "gptqmodel"))


@dataclass(frozen=True)
class AwqOptions:
    bits: int = field(default=4, metadata=_choices(4))
    group_size: int = field(default=128, metadata=_choices(32, 64, 128))
    expert_naming: str = field(default="legacy", metadata=_choices("legacy", "gptqmodel"))


OPTIONS: dict[str, type] = {"gguf": GgufOptions, "hf": HfOptions, "gptq": GptqOptions, "awq": AwqOptions}


@dataclass(frozen=True)
class ArtifactSpec:
    """One artifact of a release: its name, format, the format's settings and its thresholds."""

    name: str
    to: str
    options: GgufOptions | HfOptions | GptqOptions | AwqOptions
    verify: VerifySpec = VerifySpec()

    @property
    def needs_imatrix(self) -> bool:
        return isinstance(self.options, GgufOptions) and self.options.imatrix

    @property
    def calibrated(self) -> bool:
        return self.to in ("gptq", "awq")

    def settings(self) -> dict:
        """The resolved settings, as plain data (manifest, build keys)."""
        return {"to": self.to, **_plain(dataclasses.asdict(self.options))}

    def label(self) -> str:
        o = self.options
        if isinstance(o, GgufOptions):
            return f"GGUF {o.outtype}" + (" (imatrix)" if o.imatrix else "")
        if isinstance(o, (GptqOptions, AwqOptions)):
            return f"{self.to.upper()} {o.bits}-bit g{o.group_size}"
        return "HF safetensors"


def default_name(to: str, options) -> str:
    if to == "gguf":
        return options.outtype
    if to in ("gptq", "awq"):
        return f"{to}-{options.bits}bit"
    return to


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return "a list of strings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(tp, str(tp))


def _check(value, tp, where: str, choices: tuple | None = None):
    """`value` as type `tp` (a scalar, `X | None` or `tuple[str, ...]`), or an InputError naming `where`."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(value, inner, where, choices)
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{where} must be {_type_name(tp)}")
        return tuple(value)
    ok = (isinstance(value, bool) if tp is bool else
          isinstance(value, int) and not isinstance(value, bool) if tp is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if tp is float else
          isinstance(value, tp))
    if not ok:
        raise InputError(f"{where} must be {_type_name(tp)}, not {value!r}")
    if choices and value not in choices:
        raise InputError(f"{where} must be one of {', '.join(map(str, choices))}, not {value!r}")
    return float(value) if tp is float else value


def _nested_class(tp) -> type | None:
    """The dataclass a field holds (also under `X | None`), or None for a scalar field."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def from_mapping(cls: type, data, where: str):
    """Validate the mapping `data` into dataclass `cls`: unknown keys, wrong types and values
    outside `choices` are refused with one line naming the key; a field that holds a dataclass
    is validated the same way (its errors read `WHERE: key.subkey ...`). Fields marked
    `internal` in their metadata are not keys a user may give."""
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a mapping of keys, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise InputError(f"{where}: unknown key {key!r} (allowed: {', '.join(fields)})")
        if value is None and fields[key].default is not dataclasses.MISSING:
            continue  # `key:` with nothing after it keeps the default
        nested = _nested_class(hints[key])
        kwargs[key] = (from_mapping(nested, value, f"{where}: {key}") if nested else
                       _check(value, hints[key], f"{where}.{key}", fields[key].metadata.get("choices")))
    for name, f in fields.items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in kwargs:
            raise InputError(f"{where}: key {name!r} is required")
    return cls(**kwargs)


def parse_artifact(data, where: str) -> ArtifactSpec:
    """One `artifacts` entry: {name, to, verify, ...settings of `to`}."""
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a mapping such as {{name: q8_0, to: gguf, outtype: q8_0}}")
    to = data.get("to")
    if to not in FORMATS:
        raise InputError(f"{where}.to must be one of {', '.join(FORMATS)}, not {to!r}")
    rest = {k: v for k, v in data.items() if k not in ("name", "to", "verify")}
    cls = OPTIONS[to]
    known = {f.name for f in dataclasses.fields(cls)}
    for key in rest:
        if key not in known:
            other = [t for t, c in OPTIONS.items() if key in {f.name for f in dataclasses.fields(c)}]
            hint = f"; it is a setting of to: {' / '.join(other)}" if other else ""
            raise InputError(f"{where}: unknown key {key!r} for to: {to} (allowed: name, to, verify, "
                             f"{', '.join(sorted(known))}){hint}")
    options = from_mapping(cls, rest, where)
    name = data.get("name", default_name(to, options))
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"{where}.name must be letters, digits, '.', '_' or '-', not {name!r}")
    if name == IMATRIX_ARTIFACT:
        raise InputError(f"{where}.name {name!r} is reserved for the release's importance matrix")
    verify = from_mapping(VerifySpec, data.get("verify") or {}, f"{where}.verify")
    for key, value in verify.overrides().items():
        if value < 0 or (key == "min_top1" and value > 1):
            raise InputError(f"{where}.verify.{key} is out of range: {value}")
    return ArtifactSpec(name=name, to=to, options=options, verify=verify)


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. `base_dir` is the recipe file's folder (relative paths resolve there)."""

    name: str
    family: str
    description: str = ""
    eos_token: str | None = None
    chat_template: str | None = None
    provenance: Provenance = Provenance()
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    ollama: Ollama | None = None
    artifacts: tuple[ArtifactSpec, ...] = ()  # validated one by one by parse_artifact
    base_dir: Path | None = field(default=None, compare=False, metadata={"internal": True})

    def check_family(self, family: str) -> None:
        if FAMILY_ALIASES.get(family, family) != self.family:
            raise InputError(f"recipe {self.name} is for {self.family} models, but the source is a {family} model")

    def path(self, relative: str | None) -> Path | None:
        """A path the recipe names, resolved against the recipe file's folder."""
        if relative is None:
            return None
        p = Path(relative)
        return p if p.is_absolute() or self.base_dir is None else self.base_dir / p

    def artifact(self, name: str) -> ArtifactSpec:
        for a in self.artifacts:
            if a.name == name:
                return a
        raise InputError(f"recipe {self.name} has no artifact {name!r} "
                         f"(it has: {', '.join(a.name for a in self.artifacts) or 'none'})")

    @property
    def needs_imatrix(self) -> bool:
        return any(a.needs_imatrix for a in self.artifacts)

    def as_dict(self) -> dict:
        """The recipe as resolved (defaults filled in), for the manifest."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("artifacts", "base_dir")}
        out = _plain({k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in d.items()})
        out["artifacts"] = [{"name": a.name, **a.settings(), "verify": a.verify.overrides()} for a in self.artifacts]
        return out


def parse_recipe(data, where: str, base_dir: Path | None = None) -> Recipe:
    """A recipe mapping (parsed YAML) validated into a Recipe."""
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a mapping of keys, not {type(data).__name__}")
    recipe = from_mapping(Recipe, {k: v for k, v in data.items() if k != "artifacts"}, where)
    raw = data.get("artifacts") or []
    if not isinstance(raw, list):
        raise InputError(f"{where}: artifacts must be a list")
    arts: list[ArtifactSpec] = []
    for i, entry in enumerate(raw):
        label = entry.get("name") if isinstance(entry, dict) and isinstance(entry.get("name"), str) else None
        a = parse_artifact(entry, f"{where}: artifacts[{i}]" + (f" ({label})" if label else ""))
        if any(b.name == a.name for b in arts):
            raise InputError(f"{where}: artifact name {a.name!r} is used twice (artifacts[{i}]); give each a unique name")
        arts.append(a)
    o = recipe.ollama
    if o is not None and any('"""' in (t or "") for t in (o.template, o.system)):
        raise InputError(f'{where}: ollama.template and ollama.system cannot contain """ (the Modelfile quotes them so)')
    for key, lo in (("nsamples", 1), ("seqlen", 8)):
        if getattr(recipe.calibration, key) < lo:
            raise InputError(f"{where}: calibration.{key} must be at least {lo}")
    for key, lo in (("ctx", 16), ("max_windows", 1)):
        if getattr(recipe.evaluation, key) < lo:
            raise InputError(f"{where}: evaluation.{key} must be at least {lo}")
    return dataclasses.replace(recipe, artifacts=tuple(arts), base_dir=base_dir)

