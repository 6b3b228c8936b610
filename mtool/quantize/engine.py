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
from ..numerics import check_finite
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
    expert_tokens: list[int] | None = None  # MoE: calibration tokens the router sent to each expert
    stat_tokens: int | None = None  # MoE: tokens in every expert's statistics (all of them)


def is_moe(model: CanonicalModel) -> bool:
    return bool(model.config.get("num_local_experts"))


def hf_config_object(model: CanonicalModel):
    from transformers import LlamaConfig, MixtralConfig

    from ..convert.hf_export import hf_config

    cfg = (MixtralConfig if is_moe(model) else LlamaConfig).from_dict(hf_config(model))
    cfg._attn_implementation = "sdpa"  # causal without an explicit mask
    return cfg


class LayerRunner:
    """Builds decoder layers from canonical tensors and runs them over the calibration activations."""

    def __init__(self, model: CanonicalModel, ids: torch.Tensor, settings: QuantSettings):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.model, self.s, self.moe = model, settings, is_moe(model)
        self.config = hf_config_object(model)
        self.by_name = {t.name: t for t in model.tensors}
        dev = settings.device
        emb = _checked(self.by_name["model.embed_tokens.weight"])
        self.x = emb[ids].to(dev)  # [n, seq, hidden]
        del emb
        rot = LlamaRotaryEmbedding(self.config).to(dev)
        pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0)
        self.pos = rot(self.x[:1], pos)

    def layer(self, i: int):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

        layer = (MixtralDecoderLayer if self.moe else LlamaDecoderLayer)(self.config, i)
        prefix = f"model.layers.{i}."
        sd = {n[len(prefix):]: _checked(t) for n, t in self.by_name.items() if n.startswith(prefix)}
        if self.moe:  # canonical per-expert tensors -> the fused parameters of transformers' module
            e_n = self.config.num_local_experts
            p = "block_sparse_moe.experts"
            sd["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{p}.{e}.w1.weight"), sd.pop(f"{p}.{e}.w3.weight")])
                                                          for e in range(e_n)])
            sd["mlp.experts.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.w2.weight") for e in range(e_n)])
            sd["mlp.gate.weight"] = sd.pop("block_sparse_moe.gate.weight")
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
        """Run the layer over x and hand each named module's input to on_input. With one module, the
        forward stops right there (nothing after it is needed), which roughly halves GPTQ's forward work."""
        mods = dict(layer.named_modules())
        stop_early = len(names) == 1

        def pre_hook(module, args, n):
            on_input(n, args[0])
            if stop_early:
                raise _StopForward

        hooks = [mods[n].register_forward_pre_hook(lambda m, args, n=n: pre_hook(m, args, n)) for n in names]
        try:
            for b in range(0, x.shape[0], self.s.batch):
                try:
                    layer(x[b : b + self.s.batch], position_embeddings=self.pos, attention_mask=None)
                except _StopForward:
                    pass
        finally:
            for h in hooks:
                h.remove()


class _StopForward(Exception):
    """Raised by a capture hook once the input it needs has been seen."""


def _checked(t) -> torch.Tensor:
    """A canonical tensor in float32, refused when it holds NaN/Inf (would quantize to garbage)."""
    w = t.load()
    check_finite(w, t.name)
    return w.to(torch.float32)


def _set_weight(layer, name: str, w: torch.Tensor) -> None:
    dict(layer.named_modules())[name].weight.data = w.to(torch.float32)


def _rel_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, rows: int = 256) -> float:
    """Relative output error tr(D H D^T) / tr(W H W^T) for the calibration inputs, estimated on
    evenly spaced output rows (the exact trace costs out x in^2 per linear, just for a report)."""
    pick = torch.linspace(0, w.shape[0] - 1, min(rows, w.shape[0])).long()
    wr, d = w[pick].to(h.dtype), (w[pick] - q[pick].to(w.device)).to(h.dtype)
    num = ((d @ h) * d).sum()
    return float(num / ((wr @ h) * wr).sum().clamp(min=1e-20))


class ExpertWeights:
    """Read/write one expert's w1 / w3 / w2 inside transformers' fused MoE parameters."""

    def __init__(self, layer, n_ff: int):
        self.gate_up, self.down, self.f = layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj, n_ff

    def get(self, e: int, w: str) -> torch.Tensor:
        return {"w1": self.gate_up.data[e, : self.f], "w3": self.gate_up.data[e, self.f :], "w2": self.down.data[e]}[w]

    def set(self, e: int, w: str, value: torch.Tensor) -> None:
        self.get(e, w).copy_(value)


def _moe_inputs(runner: LayerRunner, layer, x: torch.Tensor) -> torch.Tensor:
    feats: list[torch.Tensor] = []
    runner.capture(layer, ("mlp",), x, lambda n, inp: feats.append(inp.detach().reshape(-1, inp.shape[-1])))
    return torch.cat(feats)


def routed_counts(layer, xs: torch.Tensor, top_k: int) -> list[int]:
    """How many calibration tokens the router sends to each expert (for the report)."""
    with torch.no_grad():
        logits = torch.nn.functional.linear(xs, layer.mlp.gate.weight)
        idx = torch.topk(logits.softmax(-1), top_k, dim=-1).indices
        return torch.bincount(idx.flatten(), minlength=logits.shape[-1]).tolist()


def _expert_mid(xs: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, act, chunk: int = 4096):
    for t in range(0, xs.shape[0], chunk):
        part = xs[t : t + chunk]
        yield act(part @ w1.t()) * (part @ w3.t())


def quantize_moe_gptq(runner: LayerRunner, layer, x: torch.Tensor, s: QuantSettings, results: dict, errors: dict) -> list[int]:
    """Every calibration token visits every expert: w1/w3 share the Hessian of all tokens, and each
    w2 sees its expert's activations for all tokens; the router stays unquantized."""
    xs = _moe_inputs(runner, layer, x)
    counts = routed_counts(layer, xs, runner.config.num_experts_per_tok)
    runner.stat_tokens = xs.shape[0]
    h_in = Hessian(xs.shape[1], s.device)
    h_in.add(xs)
    ew = ExpertWeights(layer, runner.config.intermediate_size)
    act = layer.mlp.experts.act_fn
    for e in range(runner.config.num_local_experts):
        for w in ("w1", "w3"):
            r = _gptq_or_rtn(ew.get(e, w).clone(), h_in, s)
            errors[f"block_sparse_moe.experts.{e}.{w}"] = _rel_error(ew.get(e, w).cpu(), r.dequant, h_in.h.cpu())
            ew.set(e, w, r.dequant.to(s.device))
            results[f"block_sparse_moe.experts.{e}.{w}"] = r
        h_mid = Hessian(runner.config.intermediate_size, s.device)
        for mid in _expert_mid(xs, ew.get(e, "w1"), ew.get(e, "w3"), act):
            h_mid.add(mid)
        r = _gptq_or_rtn(ew.get(e, "w2").clone(), h_mid, s)
        errors[f"block_sparse_moe.experts.{e}.w2"] = _rel_error(ew.get(e, "w2").cpu(), r.dequant, h_mid.h.cpu())
        ew.set(e, "w2", r.dequant.to(s.device))
        results[f"block_sparse_moe.experts.{e}.w2"] = r
    return counts


def _gptq_or_rtn(w: torch.Tensor, h: Hessian, s: QuantSettings):
    """Runs where the layer runs (cuda or cpu); results come back on the CPU for packing."""
    if s.method == "rtn":
        return rtn(w, s.bits, s.group_size, s.sym)
    return gptq(w, h, s.bits, s.group_size, s.sym, desc_act=s.desc_act, damp=s.damp)[0]


def quantize_layer_gptq(runner: LayerRunner, layer, x: torch.Tensor, s: QuantSettings) -> tuple[dict, dict]:
    results, errors = {}, {}
    mods = dict(layer.named_modules())
    for group in GROUPS:
        if runner.moe and group[0].startswith("mlp."):
            if group == GROUPS[2]:
                runner.expert_tokens = quantize_moe_gptq(runner, layer, x, s, results, errors)
            continue
        # the linears of a group read the same input (q/k/v: the normed hidden state; gate/up likewise),
        # so one Hessian serves the group: the x^T x products dominate the time on long calibration sets
        shared = Hessian(mods[group[0]].in_features, s.device)
        runner.capture(layer, group[:1], x, lambda n, inp: shared.add(inp))
        hs = dict.fromkeys(group, shared)
        for n in group:
            w = mods[n].weight.data.clone()
            r = _gptq_or_rtn(w, hs[n], s)
            errors[n] = _rel_error(w.cpu(), r.dequant, hs[n].h.cpu())
            _set_weight(layer, n, r.dequant.to(s.device))
            results[n] = r
    return results, errors


# -- AWQ ------------------------------------------------------------------------------------

AWQ_GRID = 20


def _awq_fake_quant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    out_f, in_f = w.shape
    g = w.reshape(-1, group)
    s, z = grid(g, bits, sym=False, min_zero=0)
    q = quantize_codes(g, s, z, bits)
    return ((q - z.unsqueeze(1)) * s.unsqueeze(1)).reshape(out_f, in_f)


@torch.no_grad()
def _search_scale(block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weights: list, bits: int,
                  group: int) -> torch.Tensor:
    """AWQ scale search: s = x_mean^a / w_mean^(1-a), a in {0, 0.05, ..., 0.95}, by block-output MSE.

    `weights` are (get, set) pairs of the [out, in] matrices that consume x."""
    x_mean = x.abs().reshape(-1, x.shape[-1]).mean(0).float()
    originals = [get().clone() for get, _ in weights]
    w = torch.cat(originals, dim=0)
    wg = w.abs().reshape(-1, group)
    w_mean = (wg / wg.amax(dim=1, keepdim=True).clamp(min=1e-12)).reshape(w.shape).mean(0)
    ref = block(x)
    best, best_loss = None, float("inf")
    for k in range(AWQ_GRID):
        a = k / AWQ_GRID
        s = (x_mean.pow(a) / w_mean.pow(1 - a).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for (_, put), o in zip(weights, originals):
            put(_awq_fake_quant(o * s, bits, group) / s)
        loss = float((block(x) - ref).float().pow(2).mean())
        if loss < best_loss:
            best, best_loss = s.clone(), loss
    for (_, put), o in zip(weights, originals):
        put(o)
    return best


def _linear_handle(m: torch.nn.Linear) -> tuple[Callable, Callable]:
    def put(v: torch.Tensor) -> None:
        m.weight.data = v

    return (lambda: m.weight.data), put


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
    names = ("self_attn.q_proj", "self_attn.o_proj") + (("mlp",) if runner.moe else ("mlp.gate_proj", "mlp.down_proj"))
    runner.capture(layer, names, x, lambda n, inp: inputs.setdefault(n, []).append(inp.detach()))
    feats = {n: torch.cat(v) for n, v in inputs.items()}
    attn = mods["self_attn"]

    def attn_block(h: torch.Tensor) -> torch.Tensor:
        return torch.cat([attn(h[b : b + s.batch], position_embeddings=runner.pos, attention_mask=None)[0]
                          for b in range(0, h.shape[0], s.batch)])

    def fold(prev, sc: torch.Tensor, weights: list) -> None:
        """Previous op's output divided by s, the consumers' input columns multiplied by s."""
        if isinstance(prev, tuple):  # (get, set) of a matrix whose rows produce the input
            get, put = prev
            put(get() / sc.view(-1, 1))
        elif isinstance(prev, torch.nn.Linear):
            prev.weight.data = prev.weight.data / sc.view(-1, 1)
            if prev.bias is not None:
                prev.bias.data = prev.bias.data / sc
        else:
            prev.weight.data = prev.weight.data / sc
        for get, put in weights:
            put(get() * sc.view(1, -1))

    lin = {n: _linear_handle(mods[n]) for n in LINEARS if n in mods}
    with torch.no_grad():
        qkv = [lin["self_attn.q_proj"], lin["self_attn.k_proj"], lin["self_attn.v_proj"]]
        sc = _search_scale(attn_block, feats["self_attn.q_proj"], qkv, s.bits, s.group_size)
        fold(mods["input_layernorm"], sc, qkv)
        feats["self_attn.q_proj"] = feats["self_attn.q_proj"] / sc
        if mods["self_attn.v_proj"].weight.shape == mods["self_attn.o_proj"].weight.shape:  # v -> o only without GQA
            sc = _search_scale(mods["self_attn.o_proj"], feats["self_attn.o_proj"], [lin["self_attn.o_proj"]], s.bits, s.group_size)
            fold(mods["self_attn.v_proj"], sc, [lin["self_attn.o_proj"]])
            feats["self_attn.o_proj"] = feats["self_attn.o_proj"] / sc
        if runner.moe:
            todo = _awq_moe_scales(runner, layer, feats, s, fold)
        else:
            gu = [lin["mlp.gate_proj"], lin["mlp.up_proj"]]
            sc = _search_scale(mods["mlp"], feats["mlp.gate_proj"], gu, s.bits, s.group_size)
            fold(mods["post_attention_layernorm"], sc, gu)
            feats["mlp.gate_proj"] = feats["mlp.gate_proj"] / sc
            sc = _search_scale(mods["mlp.down_proj"], feats["mlp.down_proj"], [lin["mlp.down_proj"]], s.bits, s.group_size)
            fold(mods["mlp.up_proj"], sc, [lin["mlp.down_proj"]])
            feats["mlp.down_proj"] = feats["mlp.down_proj"] / sc
            todo = [(n, lin[n], feats[f]) for n, f in (("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.gate_proj"),
                                                       ("mlp.down_proj", "mlp.down_proj"))]
    todo = [(n, lin[n], feats[f]) for n, f in (("self_attn.q_proj", "self_attn.q_proj"), ("self_attn.k_proj", "self_attn.q_proj"),
                                               ("self_attn.v_proj", "self_attn.q_proj"), ("self_attn.o_proj", "self_attn.o_proj"))] + todo
    results, errors = {}, {}
    for n, (get, put), feat in todo:
        w = get().clone()
        if not n.endswith(("q_proj", "k_proj")):  # as published: q/k are not clipped
            w = _search_clip(w, feat, s.bits, s.group_size)
        r = rtn(w.cpu(), s.bits, s.group_size, sym=False, min_zero=0)
        h = Hessian(w.shape[1])
        h.add(feat.reshape(-1, feat.shape[-1]).cpu())
        errors[n] = _rel_error(get().cpu(), r.dequant, h.h)
        put(r.dequant.to(s.device))
        results[n] = r
    return results, errors


def _awq_moe_scales(runner: LayerRunner, layer, feats: dict, s: QuantSettings, fold) -> list:
    """Mixtral: post_attention_layernorm -> every expert's w1, w3 (judged on the routed MoE output);
    then each expert's w3 -> w2 on that expert's activations for all tokens. Router untouched."""
    ew = ExpertWeights(layer, runner.config.intermediate_size)
    n_exp = runner.config.num_local_experts
    xs = feats["mlp"].reshape(-1, feats["mlp"].shape[-1])
    runner.expert_tokens = routed_counts(layer, xs, runner.config.num_experts_per_tok)
    runner.stat_tokens = xs.shape[0]

    def handle(e: int, w: str):
        return (lambda: ew.get(e, w)), (lambda v: ew.set(e, w, v))

    w13 = [handle(e, w) for e in range(n_exp) for w in ("w1", "w3")]
    moe = layer.mlp
    sc = _search_scale(lambda h: moe(h.unsqueeze(0))[0], xs, w13, s.bits, s.group_size)
    fold(layer.post_attention_layernorm, sc, w13)
    xs = xs / sc
    todo = []
    act = moe.experts.act_fn
    for e in range(n_exp):
        mid = torch.cat(list(_expert_mid(xs, ew.get(e, "w1"), ew.get(e, "w3"), act)))
        w2 = handle(e, "w2")
        sc = _search_scale(lambda h, e=e: h @ ew.get(e, "w2").t(), mid, [w2], s.bits, s.group_size)
        fold(handle(e, "w3"), sc, [w2])
        mid = mid / sc
        p = f"block_sparse_moe.experts.{e}"
        todo += [(f"{p}.w1", handle(e, "w1"), xs), (f"{p}.w3", handle(e, "w3"), xs), (f"{p}.w2", w2, mid)]
    return todo


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
        runner.expert_tokens = runner.stat_tokens = None
        results, errors = fn(runner, layer, x, settings)
        x = runner.forward(layer, x)  # the quantized layer feeds the next
        yield i, layer, results, LayerReport(i, time.perf_counter() - t0, errors, runner.expert_tokens, runner.stat_tokens)
        del layer
