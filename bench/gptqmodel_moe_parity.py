"""Why GPTQModel's loader and mtool's dequantizer disagree more on an MoE checkpoint than on a dense one.

    python bench/gptqmodel_moe_parity.py          # needs bench/out/gq-venv with gptqmodel (see BENCHMARKS.md)

Quantizes the test suite's tiny Mixtral (8 experts, top-2) with `--expert-naming gptqmodel`, then:
the logits of mtool's dequantizer (f32) and of GPTQModel's loader (its CPU kernel), the weight each of
GPTQModel's modules really applies (its output for the identity matrix) against mtool's dequantized
weight, and the KL divergence when those weights run in mtool's f32 model with free routing and with
the routing held at mtool's choices. Prints one table.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out" / "moe-parity"
EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj")


def theirs() -> None:
    """(in gq-venv) GPTQModel's logits and effective weights."""
    from gptqmodel import GPTQModel

    ids = torch.load(OUT / "ids.pt")
    m = GPTQModel.load(str(OUT / "q"), device="cpu", dtype=torch.float32)
    res: dict = {"weights": {}}
    with torch.no_grad():
        res["logits"] = m(ids).logits.double()
        for n, mod in m.model.named_modules():
            if hasattr(mod, "qweight"):
                y = mod(torch.eye(mod.in_features)).float()
                if getattr(mod, "bias", None) is not None:
                    y = y - mod.bias.float()
                res["weights"][n] = y.t().contiguous()
                res["kernel"] = type(mod).__name__
    torch.save(res, OUT / "theirs.pt")


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import MIXTRAL_SPEC
    from moe_routing import kld, mixtral_routing

    from mtool.model.families import load_canonical
    from mtool.quantize.engine import QuantSettings
    from mtool.quantize.export import export_quantized
    from mtool.tiny import make_tiny_llama
    from mtool.verify.quantized import QuantizedRunner

    OUT.mkdir(parents=True, exist_ok=True)
    src = OUT / "mixtral"
    if not (src / "config.json").is_file():
        make_tiny_llama(src, MIXTRAL_SPEC)
    export_quantized(load_canonical(src), OUT / "q", QuantSettings("gptq", bits=4, group_size=128, sym=True),
                     nsamples=16, seqlen=128, progress=False, expert_naming="gptqmodel", force=True)
    ids = torch.tensor([[1] + list(range(3, 200))])
    torch.save(ids, OUT / "ids.pt")
    venv_py = OUT.parent / "gq-venv" / "bin" / "python"
    subprocess.run([str(venv_py), __file__, "--theirs"], check=True, capture_output=True)
    t = torch.load(OUT / "theirs.pt")
    model = QuantizedRunner(OUT / "q", "cpu").model
    params = dict(model.named_parameters())

    def ours(name: str) -> torch.Tensor:
        m = EXPERT.fullmatch(name)
        if not m:
            return params[name + ".weight"]
        i, e, k = m.group(1), int(m.group(2)), m.group(3)
        if k == "down":
            return params[f"model.layers.{i}.mlp.experts.down_proj"][e]
        gu = params[f"model.layers.{i}.mlp.experts.gate_up_proj"][e]
        return gu[: gu.shape[0] // 2] if k == "gate" else gu[gu.shape[0] // 2 :]

    with mixtral_routing() as routing, torch.no_grad():
        exact = model(ids).logits
        mine = routing.take()
        rel = max(float(((ours(n) - w).abs() / ours(n).abs().amax(1, keepdim=True)).max()) for n, w in t["weights"].items())
        for n, w in t["weights"].items():
            ours(n).copy_(w)
        free = model(ids).logits
        flips = routing.rerouted(mine, routing.take())
        routing.hold(mine)
        held = model(ids).logits
    print(f"GPTQModel kernel on CPU: {t['kernel']}; {len(t['weights'])} quantized modules")
    print("| comparison with mtool's dequantizer (f32) | mean KLD |\n|---|---|")
    print(f"| GPTQModel's loader, logits | {kld(exact, t['logits']):.2e} |")
    print(f"| GPTQModel's effective weights in mtool's f32 model, free routing | {kld(exact, free):.2e} |")
    print(f"| the same, routing held at mtool's choices | {kld(exact, held):.2e} |")
    print(f"\nlargest weight difference: {rel:.2e} of the row's max |w|; tokens re-routed per layer: "
          f"{', '.join(f'{f:.1%}' for f in flips)}")


if __name__ == "__main__":
    theirs() if "--theirs" in sys.argv else main()
