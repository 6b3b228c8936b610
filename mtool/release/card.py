"""The model card (DIR/README.md, in the Hub's conventions) and Ollama Modelfiles of a release."""

from __future__ import annotations

from pathlib import PurePosixPath

import yaml

from ..recipes.schema import Recipe

_TAGS = {"gguf": "gguf", "gptq": "gptq", "awq": "awq", "hf": "safetensors"}


def modelfile(recipe: Recipe, gguf_file: str) -> str:
    """An Ollama Modelfile for one GGUF (FROM, TEMPLATE, PARAMETER stop, SYSTEM)."""
    o = recipe.ollama
    lines = [f"FROM ./{gguf_file}", f'TEMPLATE """{o.template}"""']
    stops = list(o.stop) or ([recipe.eos_token] if recipe.eos_token else [])
    lines += [f"PARAMETER stop {_quote(s)}" for s in stops]
    if o.system:
        lines.append(f'SYSTEM """{o.system}"""')
    return "\n".join(lines) + "\n"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def front_matter(manifest: dict, recipe: Recipe) -> dict:
    p = recipe.provenance
    kinds = {a["to"] for a in manifest["artifacts"] if a["status"] != "failed" and a["to"] in _TAGS}
    meta: dict = {}
    if p.base_model:
        meta["base_model"] = p.base_model
        meta["base_model_relation"] = "quantized"
    if p.license:
        meta["license"] = p.license
    if p.languages:
        meta["language"] = list(p.languages)
    meta["library_name"] = "gguf" if kinds <= {"gguf"} else "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = sorted({_TAGS[k] for k in kinds} | set(p.tags) | {"mtool"})
    if p.quantized_by:
        meta["quantized_by"] = p.quantized_by
    return meta


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def human_size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _files(a: dict) -> str:
    if a["to"] == "gguf":
        return ", ".join(f"`{f['path']}`" for f in a["files"] if f["path"].endswith(".gguf"))
    return f"`{PurePosixPath(a['files'][0]['path']).parent}/`"


def model_card(manifest: dict, recipe: Recipe) -> str:
    """README.md: front matter, the artifacts with their measured figures, how each was made, usage."""
    arts = [a for a in manifest["artifacts"] if a["to"] != "imatrix"]
    title = recipe.name
    out = ["---", yaml.safe_dump(front_matter(manifest, recipe), allow_unicode=True, sort_keys=False).strip(), "---",
           "", f"# {title}", ""]
    if recipe.description:
        out += [recipe.description, ""]
    p = recipe.provenance
    if p.base_model:
        out += [f"Artifacts of [{p.base_model}]({p.url}), built and verified with mtool {manifest['tools']['mtool']}. "
                f"Every artifact was run on the same text as the source model and compared token by token "
                f"(KL divergence, top-1 agreement, perplexity ratio) before publication.", ""]
    ev = manifest.get("evaluation") or {}
    out += ["## Artifacts", "",
            "| artifact | format | files | size | bits/weight | PPL ratio | mean KLD | top-1 | verdict |",
            "|---|---|---|---|---|---|---|---|---|"]
    published = [a for a in arts if a["status"] != "failed"]
    for a in published:
        m = (a.get("verify") or {}).get("metrics") or {}
        top1 = m.get("top1_agreement")
        out.append(f"| {a['name']} | {a['label']} | {_files(a)} | {human_size(a['size'])} | {a['bits_per_weight']:.2f} | "
                   f"{_fmt(m.get('ppl_ratio'), '.4f')} | {_fmt(m.get('kld_mean'), '.2e')} | "
                   f"{'-' if top1 is None else f'{100 * top1:.1f} %'} | {a['status'].upper()} |")
    failed = [a["name"] for a in arts if a["status"] == "failed"]
    if failed:
        out += ["", f"Not published: {', '.join(failed)} failed verification (figures in `manifest.json`)."]
    out += ["", f"Verified on {ev.get('windows', '?')} window(s) of up to {ev.get('ctx', '?')} tokens "
            f"({ev.get('positions', '?')} positions) of {ev.get('data') or 'mtool built-in English/Chinese text'}; "
            "thresholds and all figures are in `manifest.json`, checksums in `SHA256SUMS` (`sha256sum -c SHA256SUMS`).",
            "", "## How they were made", ""]
    cal = manifest.get("calibration") or {}
    for a in published:
        settings = ", ".join(f"{k}={v}" for k, v in a["settings"].items() if k != "to" and v not in (None, (), [], False))
        how = f"- **{a['name']}**: `{a['label']}`" + (f" ({settings})" if settings else "")
        if a["to"] in ("gptq", "awq") or (a.get("inputs") or {}).get("imatrix_sha256"):
            how += (f"; calibrated on {cal.get('nsamples')} x {cal.get('seqlen')} tokens of "
                    f"{cal.get('file') or 'the built-in text'}")
        out.append(how)
    out += ["", f"Recipe `{recipe.name}`, source digest `{manifest['source']['digest'][:16]}`; tools: "
            + ", ".join(f"{k} {v}" for k, v in manifest["tools"].items() if v) + ".", ""]
    out += _usage(arts, recipe)
    return "\n".join(out) + "\n"


def _usage(arts: list[dict], recipe: Recipe) -> list[str]:
    ok = [a for a in arts if a["status"] != "failed"]
    gguf = next((a for a in ok if a["to"] == "gguf"), None)
    hf = next((a for a in ok if a["to"] in ("hf", "gptq", "awq")), None)
    out = ["## Usage", ""]
    stop = recipe.eos_token
    if gguf:
        f = gguf["files"][0]["path"]
        out += ["llama.cpp:", "", "```sh", f"llama-cli -m {f} -cnv" + (f" -r {_quote(stop)}" if stop else ""),
                f"llama-server -m {f} --port 8080", "```", ""]
        mf = next((x["path"] for x in gguf["files"] if x["path"].endswith(".Modelfile")), None)
        if mf:
            out += ["Ollama:", "", "```sh", f"ollama create {recipe.name}-{gguf['name']} -f {mf}",
                    f"ollama run {recipe.name}-{gguf['name']}", "```", ""]
    if hf:
        d = hf["files"][0]["path"].rsplit("/", 1)[0]
        out += ["transformers:", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'tok = AutoTokenizer.from_pretrained("{d}")',
                f'model = AutoModelForCausalLM.from_pretrained("{d}", device_map="auto")',
                'ids = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True, '
                'return_tensors="pt").to(model.device)',
                "print(tok.decode(model.generate(ids, max_new_tokens=64)[0]))", "```", ""]
        quant = f" --quantization {hf['to']}" if hf["to"] in ("gptq", "awq") else ""
        out += ["vLLM:", "", "```sh", f"vllm serve {d}{quant}", "```", ""]
    if recipe.chat_template:
        out += ["Chat template (also in the GGUF's `tokenizer.chat_template` and the tokenizer config):", "",
                "```jinja", recipe.chat_template, "```", ""]
    if stop:
        out += [f"Generation ends at `{stop}`.", ""]
    return out
