"""Release recipes: a model family's chat template, special tokens, provenance and artifacts.

Built-in recipes are the YAML files beside this module (one per seed family); `--recipe` / `-r`
also takes a path to a YAML file of the same form (the schema is `schema.py`):

    name: my-model
    family: llama | mixtral | qwen2 | telechat
    description: free text
    eos_token: "<|im_end|>"          # optional: the token that ends generation
    chat_template: "{% ... %}"       # optional: Jinja template written into the artifacts
    provenance: {base_model: org/my-model, license: apache-2.0, languages: [zh, en], quantized_by: my-team}
    calibration: {file: calib.txt, nsamples: 32, seqlen: 256}   # GPTQ/AWQ and the importance matrix
    evaluation: {data: eval.txt, ctx: 512, max_windows: 8}      # the windows every artifact is verified on
    ollama: {template: "{{ .Prompt }}", stop: ["</s>"]}          # a Modelfile beside each GGUF
    artifacts:
      - {name: q8_0, to: gguf, outtype: q8_0, verify: {max_kld: 0.01}}
      - {name: q4_k_m, to: gguf, outtype: q4_k_m, imatrix: true}
      - {name: gptq-4bit, to: gptq, bits: 4, group_size: 128}
      - {name: hf, to: hf}
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from ..errors import InputError
from .schema import FAMILY_ALIASES, ArtifactSpec, Recipe, parse_recipe

__all__ = ["ArtifactSpec", "Recipe", "builtin_names", "load_recipe", "check_chat_template", "FAMILY_ALIASES"]

def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML recipe file, validated (errors name the key at fault)."""
    name_or_path = str(name_or_path)
    path = Path(name_or_path)
    base_dir = None
    if path.suffix in (".yaml", ".yml") and path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"recipe {path} cannot be read: {e}") from None
        base_dir = path.resolve().parent
    elif name_or_path in builtin_names():
        text = resources.files(__name__).joinpath(f"{name_or_path}.yaml").read_text(encoding="utf-8")
    elif path.suffix in (".yaml", ".yml"):
        raise InputError(f"recipe file {path} not found")
    else:
        raise InputError(f"unknown recipe {name_or_path!r} (built-in: {', '.join(builtin_names())}; or a .yaml file)")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise InputError(f"recipe {name_or_path}: invalid YAML: {' '.join(str(e).split())}") from None
    recipe = parse_recipe(data, f"recipe {name_or_path}", base_dir)
    if recipe.chat_template:
        check_chat_template(recipe.chat_template, f"recipe {name_or_path}: chat_template")
    return recipe


def check_chat_template(template: str, where: str) -> None:
    """A chat template must compile in the sandboxed Jinja environment transformers renders it in."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(template)
    except TemplateSyntaxError as e:
        raise InputError(f"{where} is not a valid Jinja template (line {e.lineno}: {e.message})") from None
