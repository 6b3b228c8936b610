"""Layer-by-layer calibrated quantization on transformers' own decoder layers.

Only the embeddings, the current decoder layer and the calibration activations are in memory:
the calibration windows are embedded, then for each layer its weights are loaded from the
canonical model into a `LlamaDecoderLayer`, statistics are collected with hooks, its linears
are quantized (GPTQ: one true-sequential group at a time, each seeing its quantized
predecessors; AWQ: scale search and folding, clip search, then the grid), and the quantized
layer produces the next layer's inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..convert.canonical import CanonicalModel
from ..errors import MtoolError
from .gptq import Hessian, grid, gptq, quantize_codes, rtn

# true-sequential order inside a Llama layer
GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEARS = tuple(n for g in GROUPS for n in g)


@dataclass
class QuantSettings:
    method: str  # "gptq" | "awq" | "rtn"
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    damp: float = 0.01
    batch: int = 8  # calibration windows per forward
    device: str = "cpu"


@dataclass
class LayerReport:
    index: int
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)  # relative output error per linear


def hf_config_object(model: CanonicalModel):
    from transformers import LlamaConfig

    from ..convert.hf_export import hf_config

    if model.config.get("num_local_experts"):
        raise MtoolError("GPTQ/AWQ of MoE (Mixtral) models is not available yet")
    cfg = LlamaConfig.from_dict(hf_config(model))
    cfg._attn_implementation = "sdpa"  # causal without an explicit mask
    return cfg


class LayerRunner:
    """Builds decoder layers from canonical tensors and runs them over the calibration activations."""

    def __init__(self, model: CanonicalModel, ids: torch.Tensor, settings: QuantSettings):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.model, self.s = model, settings
        self.config = hf_config_object(model)
        self.by_name = {t.name: t for t in model.tensors}
        dev = settings.device
        emb = self.by_name["model.embed_tokens.weight"].load().to(torch.float32)
        self.x = emb[ids].to(dev)  # [n, seq, hidden]
        del emb
        rot = LlamaRotaryEmbedding(self.config).to(dev)
        pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0)
        self.pos = rot(self.x[:1], pos)

    def layer(self, i: int):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        layer = LlamaDecoderLayer(self.config, i)
        prefix = f"model.layers.{i}."
        sd = {n[len(prefix):]: t.load().to(torch.float32) for n, t in self.by_name.items() if n.startswith(prefix)}
        missing, unexpected = layer.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if not m.endswith(".bias")]:
            raise MtoolError(f"layer {i}: weights do not fit LlamaDecoderLayer (missing {missing}, unexpected {unexpected})")
        return layer.to(self.s.device).eval()

    @torch.no_grad()
    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        outs = [layer(x[b : b + self.s.batch], position_embeddings=self.pos, attention_mask=None)
                for b in range(0, x.shape[0], self.s.batch)]
        return torch.cat([o[0] if isinstance(o, tuple) else o for o in outs])

    @torch.no_grad()
    def capture(self, layer, names: tuple[str, ...], x: torch.Tensor, on_input: Callable[[str, torch.Tensor], None]) -> None:
        mods = dict(layer.named_modules())
        hooks = [mods[n].register_forward_hook(lambda m, inp, out, n=n: on_input(n, inp[0])) for n in names]
        try:
            self.forward(layer, x)
        finally:
            for h in hooks:
                h.remove()


def _set_weight(layer, name: str, w: torch.Tensor) -> None:
    dict(layer.named_modules())[name].weight.data = w.to(torch.float32)


def _rel_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error tr(D H D^T) / tr(W H W^T) for the calibration inputs."""
    d = (w - q).to(h.dtype)
    return float(torch.einsum("oi,ij,oj->", d, h, d) / torch.einsum("oi,ij,oj->", w.to(h.dtype), h, w.to(h.dtype)).clamp(min=1e-20))


def quantize_layer_gptq(runner: LayerRunner, layer, x: torch.Tensor, s: QuantSettings) -> tuple[dict, dict]:
    results, errors = {}, {}
    mods = dict(layer.named_modules())
    for group in GROUPS:
        hs = {n: Hessian(mods[n].in_features, s.device) for n in group}
        runner.capture(layer, group, x, lambda n, inp: hs[n].add(inp))
        for n in group:
            w = mods[n].weight.data.clone()
            if s.method == "rtn":
                r = rtn(w.cpu(), s.bits, s.group_size, s.sym)
            else:
                r, _ = gptq(w.cpu(), _cpu(hs[n]), s.bits, s.group_size, s.sym, desc_act=s.desc_act, damp=s.damp)
            errors[n] = _rel_error(w.cpu(), r.dequant, hs[n].h.cpu())
            _set_weight(layer, n, r.dequant.to(s.device))
            results[n] = r
    return results, errors


def _cpu(h: Hessian) -> Hessian:
    c = Hessian(h.h.shape[0])
    c.h, c.n = h.h.cpu(), h.n
    return c


# -- AWQ ------------------------------------------------------------------------------------

AWQ_GRID = 20


def _awq_fake_quant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    out_f, in_f = w.shape
    g = w.reshape(-1, group)
    s, z = grid(g, bits, sym=False, min_zero=0)
    q = quantize_codes(g, s, z, bits)
    return ((q - z.unsqueeze(1)) * s.unsqueeze(1)).reshape(out_f, in_f)


@torch.no_grad()
def _search_scale(block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, linears: list, bits: int,
                  group: int) -> torch.Tensor:
    """AWQ scale search: s = x_mean^a / w_mean^(1-a), a in {0, 0.05, ..., 0.95}, by block-output MSE."""
    x_mean = x.abs().reshape(-1, x.shape[-1]).mean(0).float()
    w = torch.cat([m.weight.data for m in linears], dim=0)
    wg = w.abs().reshape(-1, group)
    w_mean = (wg / wg.amax(dim=1, keepdim=True).clamp(min=1e-12)).reshape(w.shape).mean(0)
    ref = block(x)
    originals = [m.weight.data.clone() for m in linears]
    best, best_loss = None, float("inf")
    for k in range(AWQ_GRID):
        a = k / AWQ_GRID
        s = (x_mean.pow(a) / w_mean.pow(1 - a).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for m, o in zip(linears, originals):
            m.weight.data = _awq_fake_quant(o * s, bits, group) / s
        loss = float((block(x) - ref).float().pow(2).mean())
        if loss < best_loss:
            best, best_loss = s.clone(), loss
    for m, o in zip(linears, originals):
        m.weight.data = o
    return best


@torch.no_grad()
def _search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group: int, n_tokens: int = 512) -> torch.Tensor:
    """AWQ clip search: per (row, group) max |w| shrunk by up to 50 %, by output MSE."""
    xs = x.reshape(-1, x.shape[-1])
    xs = xs[torch.linspace(0, xs.shape[0] - 1, min(n_tokens, xs.shape[0])).long()].float()
    out_f, in_f = w.shape
    wg = w.reshape(out_f, 1, in_f // group, group)
    xg = xs.reshape(1, xs.shape[0], in_f // group, group)
    org = (xg * wg).sum(-1)  # [out, tokens, groups]
    org_max = wg.abs().amax(dim=-1, keepdim=True)
    best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
    for i in range(int(0.5 * AWQ_GRID)):
        mx = org_max * (1 - i / AWQ_GRID)
        cur = torch.clamp(wg, -mx, mx)
        q = _awq_fake_quant(cur.reshape(out_f, in_f), bits, group).reshape(wg.shape)
        err = ((xg * q).sum(-1) - org).pow(2).mean(dim=1).view(best_err.shape)
        better = err < best_err
        best_err[better], best_max[better] = err[better], mx[better]
    return torch.clamp(wg, -best_max, best_max).reshape(out_f, in_f)


def quantize_layer_awq(runner: LayerRunner, layer, x: torch.Tensor, s: QuantSettings) -> tuple[dict, dict]:
    mods = dict(layer.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {}
    runner.capture(layer, ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"), x,
                   lambda n, inp: inputs.setdefault(n, []).append(inp.detach()))
    feats = {n: torch.cat(v) for n, v in inputs.items()}
    attn = mods["self_attn"]

    def attn_block(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([attn(h[b : b + s.batch], position_embeddings=runner.pos, attention_mask=None)[0]
                          for b in range(0, h.shape[0], s.batch)])

    # (previous op, linears, their input, block whose output is compared)
    plans = [
        (mods["input_layernorm"], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], feats["self_attn.q_proj"], attn_block),
        (mods["post_attention_layernorm"], ["mlp.gate_proj", "mlp.up_proj"], feats["mlp.gate_proj"], mods["mlp"]),
        (mods["mlp.up_proj"], ["mlp.down_proj"], feats["mlp.down_proj"], mods["mlp.down_proj"]),
    ]
    if mods["self_attn.v_proj"].weight.shape == mods["self_attn.o_proj"].weight.shape:  # v -> o only without GQA
        plans.insert(1, (mods["self_attn.v_proj"], ["self_attn.o_proj"], feats["self_attn.o_proj"], mods["self_attn.o_proj"]))
    with torch.no_grad():
        for prev, names, feat, block in plans:
            linears = [mods[n] for n in names]
            sc = _search_scale(block, feat, linears, s.bits, s.group_size)
            # fold: previous op's output divided by s, the linears' input columns multiplied by s
            if isinstance(prev, torch.nn.Linear):
                prev.weight.data = prev.weight.data / sc.view(-1, 1)
                if prev.bias is not None:
                    prev.bias.data = prev.bias.data / sc
            else:
                prev.weight.data = prev.weight.data / sc
            for m in linears:
                m.weight.data = m.weight.data * sc.view(1, -1)
            if prev is mods["post_attention_layernorm"] or prev is mods["input_layernorm"]:
                feat.div_(sc)
            elif prev is mods["mlp.up_proj"]:
                feats["mlp.down_proj"] = feats["mlp.down_proj"] / sc
            else:
                feats["self_attn.o_proj"] = feats["self_attn.o_proj"] / sc
    results, errors = {}, {}
    feat_of = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
               "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
               "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}
    for n in LINEARS:
        w = mods[n].weight.data.clone()
        if n not in ("self_attn.q_proj", "self_attn.k_proj"):  # as published: q/k are not clipped
            w = _search_clip(w, feats[feat_of[n]], s.bits, s.group_size)
        r = rtn(w.cpu(), s.bits, s.group_size, sym=False, min_zero=0)
        h = Hessian(w.shape[1])
        h.add(feats[feat_of[n]].cpu())
        errors[n] = _rel_error(mods[n].weight.data.cpu(), r.dequant, h.h)
        _set_weight(layer, n, r.dequant.to(s.device))
        results[n] = r
    return results, errors


def iter_quantized_layers(model: CanonicalModel, ids: torch.Tensor,
                          settings: QuantSettings) -> Iterator[tuple[int, object, dict, LayerReport]]:
    """Quantize layer after layer, yielding (i, layer module, results, report) for each finished
    layer (the module holds its folded / quantized weights) before the next one starts."""
    runner = LayerRunner(model, ids, settings)
    x = runner.x
    fn = quantize_layer_awq if settings.method == "awq" else quantize_layer_gptq
    for i in range(model.n_layers):
        t0 = time.perf_counter()
        layer = runner.layer(i)
        results, errors = fn(runner, layer, x, settings)
        x = runner.forward(layer, x)  # the quantized layer feeds the next
        yield i, layer, results, LayerReport(i, time.perf_counter() - t0, errors)
        del layer


def fp_forward_check(model: CanonicalModel, ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states through the layer runner without quantization (tests the runner)."""
    runner = LayerRunner(model, ids, QuantSettings("none"))
    x = runner.x
    for i in range(model.n_layers):
        x = runner.forward(runner.layer(i), x)
    return x
