"""Release recipes: a model family's chat template, special tokens and default artifacts.

Built-in recipes are the YAML files beside this module (one per seed family); `--recipe`
also takes a path to a YAML file of the same form:

    name: my-model
    family: llama | mixtral | telechat
    description: free text
    eos_token: "<|im_end|>"          # optional: the token that ends generation
    chat_template: "{% ... %}"       # optional: Jinja template written into the artifacts
    artifacts: [{to: gguf, outtype: q8_0, verify: {max_kld: 0.01}}]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..errors import InputError, MtoolError

# adapter family names a recipe may name (telechat52b is a telechat)
FAMILY_ALIASES = {"telechat52b": "telechat"}


@dataclass(frozen=True)
class Recipe:
    name: str
    family: str
    description: str = ""
    eos_token: str | None = None
    chat_template: str | None = None
    artifacts: list[dict] = field(default_factory=list)

    def check_family(self, family: str) -> None:
        if FAMILY_ALIASES.get(family, family) != self.family:
            raise MtoolError(f"recipe {self.name} is for {self.family} models, but the source is a {family} model")


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A built-in recipe by name, or a YAML recipe file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        text = path.read_text(encoding="utf-8")
    elif name_or_path in builtin_names():
        text = resources.files(__name__).joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
    else:
        raise MtoolError(f"unknown recipe {name_or_path!r} (built-in: {', '.join(builtin_names())}; or a .yaml file)")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InputError(f"recipe {name_or_path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise InputError(f"recipe {name_or_path} must be a mapping of fields, not {type(data).__name__}")
    known = set(Recipe.__dataclass_fields__)
    unknown = set(data) - known
    if unknown:
        raise MtoolError(f"recipe {name_or_path}: unknown field {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(known))})")
    for key in ("name", "family"):
        if not data.get(key):
            raise InputError(f"recipe {name_or_path}: field '{key}' is required")
    for key in ("name", "family", "description", "eos_token", "chat_template"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise InputError(f"recipe {name_or_path}: field '{key}' must be a string")
    if not isinstance(data.get("artifacts", []), list):
        raise InputError(f"recipe {name_or_path}: field 'artifacts' must be a list")
    if data.get("chat_template"):
        check_chat_template(data["chat_template"], f"recipe {name_or_path}: chat_template")
    return Recipe(**data)


def check_chat_template(template: str, where: str) -> None:
    """A chat template must compile in the sandboxed Jinja environment transformers renders it in."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(template)
    except TemplateSyntaxError as e:
        raise InputError(f"{where} is not a valid Jinja template (line {e.lineno}: {e.message})") from None
