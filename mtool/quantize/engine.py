"""Layer-by-layer calibrated quantization on transformers' own decoder layers.

Only the embeddings, the current decoder layer and the calibration activations are in memory:
the calibration windows are embedded, then for each layer its weights are loaded from the
canonical model into the decoder-layer class its `ArchSpec` names, statistics are collected
with hooks, its linears are quantized (GPTQ: one true-sequential group of the spec at a time,
each seeing its quantized predecessors; AWQ: the spec's smoothing mappings, clip search, then
the grid), and the quantized layer produces the next layer's inputs. GPTQ's passes over one layer
reuse the outputs of the modules already finished (`OutputMemo`), so each linear runs once.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from ..convert.hf_export import hf_config
from ..errors import MtoolError
from ..memory import available_bytes
from ..model import experts
from ..model.canonical import CanonicalModel
from ..numerics import check_finite
from .gptq import Hessian, grid, gptq_stacked, quantize_codes, rtn


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
    # bytes of finished modules' outputs kept to skip recomputing them in the layer's later passes;
    # None: a third of the memory available when the layer starts (0 turns the reuse off)
    memo_bytes: int | None = None


@dataclass
class LayerReport:
    index: int
    seconds: float
    errors: dict[str, float] = field(default_factory=dict)  # relative output error per linear
    expert_tokens: list[int] | None = None  # MoE: calibration tokens the router sent to each expert
    stat_tokens: int | None = None  # MoE: tokens in every expert's statistics (all of them)


def transformers_class(model: CanonicalModel, name: str):
    """A class of the spec's transformers modeling module (decoder layer, rotary embedding)."""
    return getattr(importlib.import_module(model.spec.modeling), name)


def hf_config_object(model: CanonicalModel):
    import transformers

    cfg = getattr(transformers, model.spec.config_class).from_dict(hf_config(model))
    cfg._attn_implementation = "sdpa"  # causal without an explicit mask
    return cfg


class LayerRunner:
    """Builds decoder layers from canonical tensors and runs them over the calibration activations."""

    def __init__(self, model: CanonicalModel, ids: torch.Tensor, settings: QuantSettings):
        self.model, self.s, self.moe = model, settings, model.moe
        self.config = hf_config_object(model)
        self.by_name = {t.name: t for t in model.tensors}
        self.expert_tokens: list[int] | None = None
        self.stat_tokens: int | None = None
        dev = settings.device
        emb = checked(self.by_name["model.embed_tokens.weight"])
        self.x = emb[ids].to(dev)  # [n, seq, hidden]
        del emb
        rot = transformers_class(model, model.spec.rotary)(self.config).to(dev)
        pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0)
        self.pos = rot(self.x[:1], pos)
        self.memo = OutputMemo(torch.nn.Module(), [], 0)

    def layer(self, i: int):
        """Decoder layer i, with a fresh memo of its finished modules' outputs."""
        layer = build_layer(self.model, self.config, self.by_name, i, self.s.device)
        budget = self.s.memo_bytes if self.s.memo_bytes is not None else available_bytes(self.s.device) // 3
        self.memo = OutputMemo(layer, expand(self.model.spec.linears, self.model.n_experts), budget)
        return layer

    def _batches(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        for k, b in enumerate(range(0, x.shape[0], self.s.batch)):
            self.memo.batch = k
            yield x[b : b + self.s.batch]

    @torch.no_grad()
    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        with self.memo.pass_():
            outs = [layer(xb, position_embeddings=self.pos, attention_mask=None) for xb in self._batches(x)]
        return torch.cat([_first(o) for o in outs])

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
            with self.memo.pass_():
                for xb in self._batches(x):
                    try:
                        layer(xb, position_embeddings=self.pos, attention_mask=None)
                    except _StopForward:
                        pass
        finally:
            for h in hooks:
                h.remove()


class OutputMemo:
    """Outputs of a layer's finished modules, so GPTQ's passes over one layer compute each linear once.

    True-sequential GPTQ runs the layer once per group of linears (each group must see its quantized
    predecessors) and once more for the next layer's input: q/k/v ran four times, gate/up twice. A
    module whose quantized linears are all done (and, the groups being in forward order, whose input
    is final too) computes the same thing in every later pass, so its output is recorded per batch in
    the first pass that runs it whole and returned by later passes instead of recomputing it. The
    largest finished modules are kept (self_attn, once o_proj is done, replaces q/k/v), within a byte
    budget; a module that does not fit is recomputed as before. Replay returns the very tensors a
    recomputation would give (same batches, same weights), so results do not depend on the budget.
    """

    def __init__(self, layer, linears: list[str], budget: int):
        self.mods = {n: m for n, m in layer.named_modules() if n}
        self.linears, self.budget = linears, budget
        self.done: set[str] = set()
        self.outs: dict[str, dict[int, object]] = {}
        self.unkept: set[str] = set()
        self.batch = 0

    def finish(self, names) -> None:
        """These linears hold their final (quantized) weights from now on."""
        self.done.update(names)

    def _finished(self) -> list[str]:
        """Modules all of whose quantized linears are done."""
        def finished(n: str) -> bool:
            under = [q for q in self.linears if q == n or q.startswith(n + ".")]
            return bool(under) and all(q in self.done for q in under)

        return [n for n in self.mods if finished(n) and n not in self.unkept]

    def clear(self) -> None:
        self.outs.clear()

    def nbytes(self) -> int:
        return sum(_nbytes(o) for v in self.outs.values() for o in v.values())

    @contextmanager
    def pass_(self) -> Iterator[None]:
        """One pass over the batches: replay what was recorded, record what has just finished."""
        def inside(n: str, among) -> bool:
            return any(n.startswith(a + ".") for a in among)

        fin = self._finished()
        replay = [n for n in fin if n in self.outs and not inside(n, self.outs)]
        cand = [n for n in fin if n not in self.outs and not inside(n, self.outs)]
        # the last pass (every linear done) records nothing: no pass comes after it
        recording = [] if self.done >= set(self.linears) else [n for n in cand if not inside(n, cand)]
        for n in replay:  # an instance attribute shadows the class's forward until deleted
            self.mods[n].forward = lambda *a, n=n, **k: self.outs[n][self.batch]
        fresh: dict[str, dict[int, object]] = {n: {} for n in recording}
        used = self.nbytes()

        def record(module, args, out, n):
            nonlocal used
            if n in fresh:
                used += _nbytes(out)
                # over the budget, or called twice in one forward (a shared module: one recorded
                # output per batch could not stand for both calls): recomputed from now on
                if used > self.budget or self.batch in fresh[n]:
                    used -= sum(_nbytes(o) for o in fresh.pop(n).values()) + _nbytes(out)
                    self.unkept.add(n)
                else:
                    fresh[n][self.batch] = out

        hooks = [self.mods[n].register_forward_hook(lambda m, a, o, n=n: record(m, a, o, n)) for n in recording]
        complete = False
        try:
            yield
            complete = True
        finally:
            for h in hooks:
                h.remove()
            for n in replay:
                del self.mods[n].forward  # back to the class's forward
        if complete:
            batches = 1 + self.batch
            for n, v in fresh.items():
                if len(v) == batches:
                    self.outs[n] = v
                    for d in [d for d in self.outs if d.startswith(n + ".")]:
                        del self.outs[d]  # the enclosing module replaces its parts


def build_layer(model: CanonicalModel, config, by_name: dict, i: int, device: str):
    """Decoder layer i as transformers' module of the spec, filled from the canonical tensors (float32)."""
    cls = transformers_class(model, model.spec.decoder_layer)
    with torch.device("meta"):  # no random init of weights that are overwritten at once (~1 s per 7B layer)
        layer = cls(config, i)
    if next(layer.buffers(), None) is not None:  # buffers are computed in __init__: build it for real
        layer = cls(config, i)
    else:
        layer = layer.to_empty(device=device)
    prefix = f"model.layers.{i}."
    sd = {n[len(prefix):]: checked(t) for n, t in by_name.items() if n.startswith(prefix)}
    if model.moe:
        sd = experts.to_fused(sd, model.n_experts)
    missing, unexpected = layer.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if not m.endswith(".bias")]:
        raise MtoolError(f"layer {i}: weights do not fit {model.spec.decoder_layer} "
                         f"(missing {missing}, unexpected {unexpected})")
    for m in missing:  # a bias the checkpoint does not have is zero
        layer.get_parameter(m).data.zero_()
    return layer.to(device).eval()


class _StopForward(Exception):
    """Raised by a capture hook once the input it needs has been seen."""


def _first(o):
    return o[0] if isinstance(o, tuple) else o


def _nbytes(o) -> int:
    if isinstance(o, torch.Tensor):
        return o.nelement() * o.element_size()
    return sum(_nbytes(v) for v in o) if isinstance(o, (tuple, list)) else 0


def checked(t) -> torch.Tensor:
    """A canonical tensor in float32, refused when it holds NaN/Inf (would quantize to garbage)."""
    w = t.load()
    check_finite(w, t.name)
    return w.to(torch.float32)


def _rel_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor, rows: int = 256) -> float:
    """Relative output error tr(D H D^T) / tr(W H W^T) for the calibration inputs, estimated on
    evenly spaced output rows (the exact trace costs out x in^2 per linear, just for a report)."""
    pick = torch.linspace(0, w.shape[0] - 1, min(rows, w.shape[0])).long()
    wr, d = w[pick].to(h.dtype), (w[pick] - q[pick].to(w.device)).to(h.dtype)
    num = ((d @ h) * d).sum()
    return float(num / ((wr @ h) * wr).sum().clamp(min=1e-20))


Handle = tuple[Callable[[], torch.Tensor], Callable[[torch.Tensor], None]]


def weight_handle(layer, name: str, n_ff: int) -> Handle:
    """(get, set) of the [out, in] weight of a layer-relative linear; experts live in the fused parameters."""
    ew = experts.parse(name)
    if ew:
        view = experts.FusedView(layer, n_ff)
        return (lambda: view.get(*ew)), (lambda v: view.set(*ew, v))
    m = dict(layer.named_modules())[name]

    def put(v: torch.Tensor) -> None:
        m.weight.data = v.to(torch.float32)

    return (lambda: m.weight.data), put


def expand(names: tuple[str, ...], n_experts: int) -> list[str]:
    """Names with `*` replaced by every expert index."""
    return [n.replace("*", str(e)) for n in names for e in (range(n_experts) if "*" in n else [None])]


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


def expert_mid(layer, xs: torch.Tensor, e: int, n_ff: int) -> torch.Tensor:
    """Expert e's down-projection input for tokens xs: act(x w1^T) * (x w3^T)."""
    view = experts.FusedView(layer, n_ff)
    return torch.cat(list(_expert_mid(xs, view.get(e, "w1"), view.get(e, "w3"), layer.mlp.experts.act_fn)))


# Rows solved in one GPTQ call at most (float32 elements): one stack's working copies (weight, result,
# block buffers) stay a few hundred MB on the CPU, a few GB on a GPU
STACK_ELEMENTS = {"cpu": 64 << 20, "cuda": 256 << 20}


def _quantize_into(layer, names: list[str], h: Hessian, s: QuantSettings, n_ff: int, results: dict,
                   errors: dict) -> None:
    """Quantize the linears `names`, which all read the input whose Hessian is h, and put their
    dequantized weights back into the layer (the next Hessians see them: true-sequential). Runs where
    the layer runs; results come back on the CPU for packing. GPTQ solves them stacked, a budget of
    rows at a time (`gptq_stacked`)."""
    budget = STACK_ELEMENTS["cuda" if str(s.device).startswith("cuda") else "cpu"]
    handles = {n: weight_handle(layer, n, n_ff) for n in names}
    stacks: list[list[str]] = []
    size = 0
    for n in names:
        numel = handles[n][0]().numel()
        if not stacks or size + numel > budget:
            stacks.append([])
            size = 0
        stacks[-1].append(n)
        size += numel
    for stack in stacks:
        ws = [handles[n][0]().clone() for n in stack]
        if s.method == "rtn":
            rs = [rtn(w, s.bits, s.group_size, s.sym) for w in ws]
        else:
            rs = gptq_stacked(ws, h, s.bits, s.group_size, s.sym, desc_act=s.desc_act, damp=s.damp)
        for n, w, r in zip(stack, ws, rs):
            errors[n] = _rel_error(w, r.dequant, h.h)  # where the Hessian is: no copy of it to the CPU per linear
            handles[n][1](r.dequant.to(s.device))
            results[n] = replace(r, dequant=None)  # the layer holds it now


def quantize_moe_gptq(runner: LayerRunner, layer, x: torch.Tensor, s: QuantSettings, results: dict, errors: dict) -> list[int]:
    """Every calibration token visits every expert: w1/w3 share the Hessian of all tokens, and each
    w2 sees its expert's activations for all tokens; the router stays unquantized."""
    xs = _moe_inputs(runner, layer, x)
    counts = routed_counts(layer, xs, runner.model.n_experts_used)
    runner.stat_tokens = xs.shape[0]
    h_in = Hessian(xs.shape[1], s.device)
    h_in.add(xs)
    n_ff = runner.config.intermediate_size
    view, act = experts.FusedView(layer, n_ff), layer.mlp.experts.act_fn
    # every expert's w1 and w3 read xs: solved stacked; then each w2 on its expert's quantized w1/w3
    _quantize_into(layer, [experts.legacy(e, w) for e in range(runner.model.n_experts) for w in ("w1", "w3")],
                   h_in, s, n_ff, results, errors)
    for e in range(runner.model.n_experts):
        h_mid = Hessian(n_ff, s.device)
        for mid in _expert_mid(xs, view.get(e, "w1"), view.get(e, "w3"), act):
            h_mid.add(mid)
        _quantize_into(layer, [experts.legacy(e, "w2")], h_mid, s, n_ff, results, errors)
    return counts


def quantize_layer_gptq(runner: LayerRunner, layer, x: torch.Tensor, s: QuantSettings) -> tuple[dict, dict]:
    results, errors = {}, {}
    mods = dict(layer.named_modules())
    for group in runner.model.spec.linear_groups:
        if "*" in group[0]:  # the expert groups: quantized together, expert by expert
            if runner.expert_tokens is None:
                runner.expert_tokens = quantize_moe_gptq(runner, layer, x, s, results, errors)
            runner.memo.finish(expand(group, runner.model.n_experts))
            continue
        # the linears of a group read the same input (q/k/v: the normed hidden state; gate/up likewise),
        # so one Hessian serves the group: the x^T x products dominate the time on long calibration sets
        shared = Hessian(mods[group[0]].in_features, s.device)
        runner.capture(layer, group[:1], x, lambda n, inp: shared.add(inp))
        _quantize_into(layer, list(group), shared, s, runner.config.intermediate_size, results, errors)
        runner.memo.finish(group)
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
def _search_scale(block: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, weights: list[Handle], bits: int,
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


@torch.no_grad()
def _search_clip(w: torch.Tensor, x: torch.Tensor, bits: int, group: int, n_tokens: int = 512,
                 chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """AWQ clip search: per (row, group) max |w| shrunk by up to 50 %, by output MSE.

    Each group's partial outputs x_g w_g^T are batched matrix products over the groups, a block of
    rows at a time, so memory is groups x tokens x rows floats (at most `chunk_bytes`), never the
    out x tokens x in broadcast (46 GB for a 7B down_proj at 256 tokens)."""
    xs = x.reshape(-1, x.shape[-1])
    xs = xs[torch.linspace(0, xs.shape[0] - 1, min(n_tokens, xs.shape[0])).long()].float()
    out_f, in_f = w.shape
    n_g = in_f // group
    xg = xs.reshape(-1, n_g, group).transpose(0, 1)  # [groups, tokens, group]
    rows = max(1, min(out_f, chunk_bytes // (4 * n_g * xs.shape[0])))
    clipped = torch.empty_like(w)
    for r0 in range(0, out_f, rows):
        wg = w[r0 : r0 + rows].reshape(-1, n_g, group)  # [rows, groups, group]
        org = torch.bmm(xg, wg.permute(1, 2, 0))  # [groups, tokens, rows]
        org_max = wg.abs().amax(dim=-1, keepdim=True)
        best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for i in range(int(0.5 * AWQ_GRID)):
            mx = org_max * (1 - i / AWQ_GRID)
            q = _awq_fake_quant(torch.clamp(wg, -mx, mx).reshape(-1, in_f), bits, group).reshape(wg.shape)
            err = (torch.bmm(xg, q.permute(1, 2, 0)) - org).pow(2).mean(dim=1).t().unsqueeze(-1)  # [rows, groups, 1]
            better = err < best_err
            best_err[better], best_max[better] = err[better], mx[better]
        clipped[r0 : r0 + rows] = torch.clamp(wg, -best_max, best_max).reshape(-1, in_f)
    return clipped


class _AwqLayer:
    """One layer's AWQ state: the inputs each linear reads (captured once, then kept in step with
    every fold), and the spec's names resolved to modules, weight handles and blocks."""

    def __init__(self, runner: LayerRunner, layer, x: torch.Tensor):
        self.runner, self.layer, self.mods = runner, layer, dict(layer.named_modules())
        self.n_exp, self.n_ff = runner.model.n_experts, runner.config.intermediate_size
        self.source: dict[str, str] = {}  # linear -> key of the input it reads
        for group in runner.model.spec.linear_groups:
            for n in expand(group, self.n_exp):
                ew = experts.parse(n)  # experts' w1/w3 read the MoE block's input; each w2 its own
                self.source[n] = group[0] if not ew else "mlp" if ew[1] != "w2" else n
        captured = tuple(dict.fromkeys(v for v in self.source.values() if v in self.mods))
        inputs: dict[str, list[torch.Tensor]] = {}
        runner.capture(layer, captured, x, lambda n, inp: inputs.setdefault(n, []).append(inp.detach()))
        self.feats = {n: torch.cat(v) for n, v in inputs.items()}
        self.transient: tuple[str, torch.Tensor] | None = None
        if runner.moe:
            xs = self.feats["mlp"].reshape(-1, self.feats["mlp"].shape[-1])
            runner.expert_tokens = routed_counts(layer, xs, runner.model.n_experts_used)
            runner.stat_tokens = xs.shape[0]

    def feature(self, n: str) -> torch.Tensor:
        key = self.source[n]
        if key in self.feats:
            return self.feats[key]
        # an expert's w2 input, from its (already smoothed) w1/w3: every calibration token's ffn-wide
        # activation, 3.8 GB per real-size Mixtral expert at 64k tokens, so one expert's is held at a
        # time and recomputed when asked again (all eight held took 44 GB of GPU memory)
        if self.transient is None or self.transient[0] != key:
            self.transient = None  # the previous expert's first
            xs = self.feats["mlp"].reshape(-1, self.feats["mlp"].shape[-1])
            self.transient = (key, expert_mid(self.layer, xs, experts.parse(n)[0], self.n_ff))
        return self.transient[1]

    def update_feature(self, n: str, value: torch.Tensor) -> None:
        key = self.source[n]
        if key in self.feats:
            self.feats[key] = value
        else:
            self.transient = (key, value)

    def handle(self, n: str) -> Handle:
        return weight_handle(self.layer, n, self.n_ff)

    def block(self, inspect: str | None, balance: list[Handle]) -> Callable[[torch.Tensor], torch.Tensor]:
        if inspect is None:  # the single balance linear (a bias would cancel in the error)
            get = balance[0][0]
            return lambda h: h @ get().t()
        m, r = self.mods[inspect], self.runner
        if inspect == "self_attn":
            return lambda h: torch.cat([m(h[b : b + r.s.batch], position_embeddings=r.pos, attention_mask=None)[0]
                                        for b in range(0, h.shape[0], r.s.batch)])
        return lambda h: _first(m(h))

    def smooth(self, n: str, sc: torch.Tensor) -> None:
        """Divide the output of `n` by sc: a norm's weight, or a linear's rows (and bias)."""
        m = self.mods.get(n)
        if m is None or isinstance(m, torch.nn.Linear):
            get, put = self.handle(n)
            put(get() / sc.view(-1, 1))
            if m is not None and m.bias is not None:
                m.bias.data = m.bias.data / sc
        else:
            m.weight.data = m.weight.data / sc

    def apply(self, mapping, s: QuantSettings) -> None:
        """Evaluate one AwqMapping (per expert when its smooth names one)."""
        for e in range(self.n_exp) if "*" in mapping.smooth else [None]:
            at = (lambda n: n.replace("*", str(e))) if e is not None else (lambda n: n)
            balance = expand(tuple(at(b) for b in mapping.balance), self.n_exp)
            handles = [self.handle(b) for b in balance]
            if mapping.same_shape and self.handle(at(mapping.smooth))[0]().shape != handles[0][0]().shape:
                continue
            x = self.feature(balance[0])
            sc = _search_scale(self.block(mapping.inspect, handles), x, handles, s.bits, s.group_size)
            self.smooth(at(mapping.smooth), sc)
            for get, put in handles:
                put(get() * sc.view(1, -1))
            self.update_feature(balance[0], x / sc)
            del x  # before the next expert's is computed


def quantize_layer_awq(runner: LayerRunner, layer, x: torch.Tensor, s: QuantSettings) -> tuple[dict, dict]:
    st = _AwqLayer(runner, layer, x)
    with torch.no_grad():
        for mapping in runner.model.spec.awq:
            st.apply(mapping, s)
    results, errors = {}, {}
    # the error report's Hessian, on the layer's device, made once per input: linears that share an
    # input follow each other in spec.linears
    h_key, h_mat = None, None
    for n in expand(runner.model.spec.linears, st.n_exp):
        get, put = st.handle(n)
        feat = st.feature(n)
        w = get().clone()
        if not n.endswith(("q_proj", "k_proj")):  # as published: q/k are not clipped
            w = _search_clip(w, feat, s.bits, s.group_size)
        r = rtn(w.cpu(), s.bits, s.group_size, sym=False, min_zero=0)
        if st.source[n] != h_key:
            h = Hessian(w.shape[1], feat.device)
            h.add(feat.reshape(-1, feat.shape[-1]))
            h_key, h_mat = st.source[n], h.h
        errors[n] = _rel_error(get(), r.dequant, h_mat)
        put(r.dequant.to(s.device))
        results[n] = replace(r, dequant=None)  # the layer holds it now
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
        runner.expert_tokens = runner.stat_tokens = None
        results, errors = fn(runner, layer, x, settings)
        x = runner.forward(layer, x)  # the quantized layer feeds the next
        runner.memo.clear()
        yield i, layer, results, LayerReport(i, time.perf_counter() - t0, errors, runner.expert_tokens, runner.stat_tokens)
        del layer
