"""Release recipes: built-ins load, apply to GGUF and HF outputs, and refuse the wrong family."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mtool.cli import cli
from mtool.errors import MtoolError
from mtool.recipes import builtin_names, load_recipe

from .telechat_reference import write_telechat


def test_builtin_recipes_cover_the_seed_families():
    assert set(builtin_names()) == {"huozi-3.5", "sus-chat-34b", "ziya2-13b-chat", "telechat"}
    for n in builtin_names():
        r = load_recipe(n)
        assert r.family in ("llama", "mixtral", "telechat") and r.chat_template and r.artifacts


def test_recipe_chat_templates_render():
    from jinja2 import Template

    msgs = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "再见"}]
    sus = Template(load_recipe("sus-chat-34b").chat_template).render(messages=msgs, add_generation_prompt=True)
    assert sus == "### Human: 你好\n\n### Assistant: hi### Human: 再见\n\n### Assistant: "
    ziya = Template(load_recipe("ziya2-13b-chat").chat_template).render(messages=msgs, add_generation_prompt=True)
    assert ziya == "<human>:你好\n<bot>:hi\n<human>:再见\n<bot>:"
    tele = Template(load_recipe("telechat").chat_template).render(messages=msgs, add_generation_prompt=True)
    assert tele == "<_user>你好<_bot>hi<_end><_user>再见<_bot>"


def test_huozi_recipe_sets_eos_and_template_in_gguf(mixtral_model, tmp_path):
    from llama_cpp import Llama

    out = tmp_path / "huozi.gguf"
    r = CliRunner().invoke(cli, ["convert", str(mixtral_model), "-o", str(out), "--recipe", "huozi-3.5", "-q"])
    assert r.exit_code == 0, r.output
    llm = Llama(str(out), vocab_only=True, verbose=False)
    assert llm.token_eos() == 701  # <|endofutterance|>, as 57001 in Huozi 3.5
    assert llm.metadata["tokenizer.chat_template"] == load_recipe("huozi-3.5").chat_template


def test_telechat_recipe_in_hf_output(tmp_path):
    from transformers import AutoTokenizer

    src = write_telechat(tmp_path / "tc", "12b")
    out = tmp_path / "hf"
    r = CliRunner().invoke(cli, ["convert", str(src), "-o", str(out), "--to", "hf", "--recipe", "telechat", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert text == "<_user>你好<_bot>"


def test_wrong_family_and_bad_recipes(mixtral_model, tmp_path):
    r = CliRunner().invoke(cli, ["convert", str(mixtral_model), "-o", str(tmp_path / "x.gguf"), "--recipe", "telechat"])
    assert r.exit_code == 2 and "is for telechat models" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfamily: llama\ncolour: blue\n")
    with pytest.raises(MtoolError, match="unknown key 'colour'"):
        load_recipe(str(bad))
    missing = tmp_path / "eos.yaml"
    missing.write_text("name: x\nfamily: mixtral\neos_token: '<|im_end|>'\n")
    r = CliRunner().invoke(cli, ["convert", str(mixtral_model), "-o", str(tmp_path / "y.gguf"), "--recipe", str(missing)])
    assert r.exit_code == 2 and "'<|im_end|>'" in r.stderr and "does not have" in r.stderr
    assert not (tmp_path / "y.gguf").exists()
