"""Which GGML type each tensor of a K-/I-quant GGUF gets: llama.cpp's own choice, as data.

This transcribes `llama_tensor_get_type` of the llama.cpp that llama-cpp-python 0.3.36 vendors
(src/llama-quant.cpp) for the llama architecture (dense and MoE), so that mtool's one-pass files
hold, tensor for tensor, the types (and, through the same libggml kernels, the bytes) that
`llama-quantize` writes. Tests compare with `llama_model_quantize` itself.

The C++ is an if / else-if chain per tensor category: a *branch* is chosen by category (and for
some by file type), inside it the first *rule* whose guard holds decides (even when it keeps
the type), a few post-rules adjust, and per-category counters advance. Tensors are visited in
llama.cpp's order (non-block tensors by name, then block by block, names sorted), which the
counters depend on.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import gguf

from ..errors import UsageError

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)  # stored as they are; every other type is quantized


@dataclass(frozen=True)
class KQuant:
    """One K-/I-quant --outtype: llama's file type and the type of a plain matrix."""

    name: str
    file_type: FT
    default: Q


KQUANTS: dict[str, KQuant] = {k.name: k for k in (
    KQuant("q2_k", FT.MOSTLY_Q2_K, Q.Q2_K), KQuant("q3_k_s", FT.MOSTLY_Q3_K_S, Q.Q3_K),
    KQuant("q3_k_m", FT.MOSTLY_Q3_K_M, Q.Q3_K), KQuant("q3_k_l", FT.MOSTLY_Q3_K_L, Q.Q3_K),
    KQuant("q4_k_s", FT.MOSTLY_Q4_K_S, Q.Q4_K), KQuant("q4_k_m", FT.MOSTLY_Q4_K_M, Q.Q4_K),
    KQuant("q5_k_s", FT.MOSTLY_Q5_K_S, Q.Q5_K), KQuant("q5_k_m", FT.MOSTLY_Q5_K_M, Q.Q5_K),
    KQuant("q6_k", FT.MOSTLY_Q6_K, Q.Q6_K), KQuant("iq4_nl", FT.MOSTLY_IQ4_NL, Q.IQ4_NL),
    KQuant("iq4_xs", FT.MOSTLY_IQ4_XS, Q.IQ4_XS), KQuant("iq3_s", FT.MOSTLY_IQ3_S, Q.IQ3_S),
    KQuant("iq3_m", FT.MOSTLY_IQ3_M, Q.IQ3_S),
    KQuant("iq3_xxs", FT.MOSTLY_IQ3_XXS, Q.IQ3_XXS), KQuant("iq2_xxs", FT.MOSTLY_IQ2_XXS, Q.IQ2_XXS),
    KQuant("iq2_xs", FT.MOSTLY_IQ2_XS, Q.IQ2_XS), KQuant("iq2_s", FT.MOSTLY_IQ2_S, Q.IQ2_XS),
    KQuant("iq2_m", FT.MOSTLY_IQ2_M, Q.IQ2_S), KQuant("iq1_s", FT.MOSTLY_IQ1_S, Q.IQ1_S),
    KQuant("iq1_m", FT.MOSTLY_IQ1_M, Q.IQ1_M),
)}

# category by name, first match wins (tensor_get_category)
_CATEGORIES = (("output.weight", "output", True), ("token_embd.weight", "token_embd", True),
               ("attn_qkv.weight", "attn_qkv", False), ("attn_kv_b.weight", "attn_kv_b", False),
               ("attn_v.weight", "attn_v", False), ("attn_k.weight", "attn_k", False),
               ("attn_q.weight", "attn_q", False), ("attn_output.weight", "attn_output", False),
               ("ffn_up", "ffn_up", False), ("ffn_gate", "ffn_gate", False), ("ffn_down", "ffn_down", False))
ATTN_V_LIKE = {"attn_v", "attn_qkv", "attn_kv_b"}
# 256-block types that cannot hold a row fall back to a 32-block type, then to F16
FALLBACK = {Q.IQ1_S: Q.IQ4_NL, Q.IQ1_M: Q.IQ4_NL, Q.IQ2_XXS: Q.IQ4_NL, Q.IQ2_XS: Q.IQ4_NL, Q.IQ2_S: Q.IQ4_NL,
            Q.IQ3_XXS: Q.IQ4_NL, Q.IQ3_S: Q.IQ4_NL, Q.IQ4_XS: Q.IQ4_NL, Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0,
            Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def category(name: str) -> str:
    for key, cat, exact in _CATEGORIES:
        if (name == key) if exact else (key in name):
            return cat
    return "other"


def quantizable(name: str, n_dims: int) -> bool:
    """tensor_allows_quantization, for the tensors a llama-architecture GGUF has."""
    return (n_dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


@dataclass
class Ctx:
    """What the rules look at for one tensor."""

    ft: str
    cat: str
    name: str
    ncols: int
    new: Q
    n_gqa: int
    n_expert: int
    n_layer: int
    has_imatrix: bool
    is_70b: bool
    i_attn_v: int = 0
    n_attn_v: int = 0
    i_layer: int = 0

    def more_bits(self, i: int, n: int) -> bool:  # use_more_bits
        return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2

    @property
    def first_eighth(self) -> bool:
        return self.i_layer < self.n_layer // 8


def _ft(*names: str) -> frozenset[str]:
    return frozenset(names)


IQ2_FAMILY = _ft("iq2_xxs", "iq2_xs", "iq1_s", "iq2_s", "iq2_m", "iq1_m")
IQ2_S_M = _ft("iq2_s", "iq2_m")
R = Callable[[Ctx], "Q | None"]


@dataclass(frozen=True)
class Rule:
    """Taken when the file type is in `ft` (None: any) and `when` holds; `to` gives the type
    (None keeps it). The first rule taken in a branch ends the branch, as an else-if does."""

    ft: frozenset[str] | None
    to: Q | R
    when: Callable[[Ctx], bool] = lambda c: True

    def applies(self, c: Ctx) -> bool:
        return (self.ft is None or c.ft in self.ft) and self.when(c)

    def result(self, c: Ctx) -> Q:
        out = self.to(c) if callable(self.to) else self.to
        return c.new if out is None else out


@dataclass(frozen=True)
class Branch:
    cats: frozenset[str]
    rules: tuple[Rule, ...]
    ft: frozenset[str] | None = None  # the branch exists only for these file types
    post: tuple[Rule, ...] = ()  # applied after the chain, each in turn
    counter: str | None = None  # advanced after the branch
    tied_embd: bool = False  # also the token embedding when the model has no output.weight
    layer_from: str | None = None  # counter that is the layer index of dense models


_GQA4 = lambda c: c.n_gqa >= 4  # noqa: E731
BRANCHES: tuple[Branch, ...] = (
    Branch(frozenset({"output"}), tied_embd=True, rules=(
        Rule(None, Q.Q8_0, lambda c: c.ncols % gguf.GGML_QUANT_SIZES[c.new][0] != 0),
        Rule(_ft("iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s", "iq2_s", "iq2_m", "iq1_m"), Q.Q5_K),
        Rule(None, Q.Q6_K, lambda c: c.new != Q.Q8_0),
    )),
    Branch(frozenset({"token_embd"}), rules=(
        Rule(_ft("iq2_xxs", "iq2_xs", "iq1_s", "iq1_m"), Q.Q2_K),
        Rule(_ft("iq2_s", "iq2_m", "iq3_xxs"), Q.IQ3_S),
    )),
    Branch(frozenset(ATTN_V_LIKE), ft=IQ2_FAMILY, counter="i_attn_v", rules=(
        Rule(None, Q.Q4_K, lambda c: c.n_gqa >= 4 or c.n_expert >= 4),
        Rule(IQ2_S_M, Q.IQ3_S), Rule(None, Q.Q2_K),
    )),
    Branch(frozenset({"attn_k"}), ft=IQ2_FAMILY, rules=(Rule(None, Q.Q4_K, lambda c: c.n_expert == 8),)),
    Branch(frozenset({"ffn_down"}), ft=IQ2_FAMILY, counter="i_ffn_down", layer_from="i_ffn_down", rules=(
        Rule(IQ2_S_M, Q.IQ3_S, lambda c: c.first_eighth), Rule(None, Q.Q2_K, lambda c: c.first_eighth),
    )),
    Branch(frozenset({"attn_output"}), ft=IQ2_FAMILY, rules=(
        Rule(None, Q.Q5_K, lambda c: c.n_expert == 8), Rule(_ft("iq1_s", "iq1_m"), Q.IQ2_XXS),
        Rule(IQ2_S_M, Q.IQ3_S),
    )),
    Branch(frozenset(), ft=IQ2_FAMILY, rules=()),  # other tensors of these files: the default type
    Branch(frozenset(ATTN_V_LIKE), counter="i_attn_v", rules=(
        Rule(_ft("q2_k"), lambda c: Q.Q4_K if c.n_gqa >= 4 else Q.Q3_K),
        Rule(_ft("q2_k_s"), Q.Q4_K, _GQA4),
        Rule(_ft("iq3_xxs"), lambda c: Q.Q4_K if c.n_gqa >= 4 else Q.IQ3_XXS if c.has_imatrix else Q.IQ3_S),
        Rule(_ft("iq3_xs", "iq3_s"), Q.Q4_K, _GQA4),
        Rule(_ft("iq3_m"), Q.Q4_K),
        Rule(_ft("q3_k_m"), lambda c: Q.Q5_K if c.i_attn_v < 2 else Q.Q4_K),
        Rule(_ft("q3_k_l"), Q.Q5_K),
        Rule(_ft("iq4_nl", "iq4_xs"), Q.Q5_K, _GQA4),
        Rule(_ft("q4_k_m", "q5_k_m"), Q.Q6_K, lambda c: c.more_bits(c.i_attn_v, c.n_attn_v)),
        Rule(_ft("q4_k_s"), Q.Q5_K, lambda c: c.i_attn_v < 4),
    ), post=(
        Rule(None, Q.Q5_K, lambda c: c.is_70b and c.new in (Q.Q3_K, Q.Q4_K)),
        Rule(None, Q.Q8_0, lambda c: c.n_expert == 8),
    )),
    Branch(frozenset({"attn_k"}), rules=(
        Rule(None, Q.Q8_0, lambda c: c.n_expert == 8), Rule(_ft("iq3_xs"), Q.IQ3_XXS), Rule(_ft("iq3_xxs"), Q.IQ2_S),
    )),
    Branch(frozenset({"attn_q"}), rules=(Rule(_ft("iq3_xs"), Q.IQ3_XXS), Rule(_ft("iq3_xxs"), Q.IQ2_S))),
    Branch(frozenset({"ffn_down"}), counter="i_ffn_down", layer_from="i_ffn_down", rules=(
        Rule(_ft("q2_k"), Q.Q3_K),
        Rule(_ft("q2_k_s"), lambda c: Q.Q4_K if c.first_eighth else None),
        Rule(_ft("iq3_xxs"), lambda c: Q.Q4_K if c.first_eighth else Q.Q3_K, lambda c: not c.has_imatrix),
        Rule(_ft("q3_k_m"), lambda c: Q.Q5_K if c.i_layer < c.n_layer // 16 else Q.Q4_K),  # not Falcon
        Rule(_ft("iq3_m"), Q.Q4_K,
             lambda c: c.first_eighth or (c.n_expert == 8 and c.more_bits(c.i_layer, c.n_layer))),
        Rule(_ft("q3_k_l"), Q.Q5_K),
        Rule(_ft("q4_k_m"), lambda c: Q.Q6_K if c.more_bits(c.i_layer, c.n_layer) else None),
        Rule(_ft("iq4_nl", "iq4_xs"), Q.Q5_K, lambda c: c.first_eighth and not c.has_imatrix),
        Rule(_ft("q5_k_m"), Q.Q6_K, lambda c: c.more_bits(c.i_layer, c.n_layer)),
        Rule(_ft("q4_k_s"), Q.Q5_K, lambda c: c.first_eighth),
    )),
    Branch(frozenset({"attn_output"}), rules=(
        Rule(_ft("q2_k", "iq3_xs", "iq3_xxs", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq3_s", "iq3_m",
                 "iq4_xs"), Q.Q5_K, lambda c: c.n_expert == 8),
        Rule(None, lambda c: None, lambda c: c.n_expert == 8),
        Rule(_ft("q2_k"), Q.Q3_K), Rule(_ft("iq3_xxs"), Q.IQ3_S), Rule(_ft("q3_k_m"), Q.Q4_K),
        Rule(_ft("q3_k_l"), Q.Q5_K), Rule(_ft("iq3_m"), Q.Q4_K),
    )),
    Branch(frozenset({"attn_qkv"}), rules=(
        Rule(_ft("q3_k_m", "q3_k_l", "iq3_m"), Q.Q4_K), Rule(_ft("q4_k_m"), Q.Q5_K), Rule(_ft("q5_k_m"), Q.Q6_K),
    )),
    Branch(frozenset({"ffn_gate"}), counter="i_ffn_gate", layer_from="i_ffn_gate", rules=(
        Rule(_ft("iq3_xs"), Q.IQ3_XXS, lambda c: c.n_layer // 8 <= c.i_layer < 7 * c.n_layer // 8),
    )),
    Branch(frozenset({"ffn_up"}), counter="i_ffn_up", layer_from="i_ffn_up", rules=(
        Rule(_ft("iq3_xs"), Q.IQ3_XXS, lambda c: c.n_layer // 8 <= c.i_layer < 7 * c.n_layer // 8),
    )),
)


def llama_order(names: list[str]) -> list[str]:
    """llama.cpp's weights_map order: non-block tensors by name, then by block, then by name."""
    def key(n: str):
        m = re.match(r"blk\.(\d+)\.", n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


# the types --tensor-type, --output-tensor-type and --token-embedding-type may name
OVERRIDE_TYPES = {q.name.lower(): q for q in (
    Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
    Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S, Q.IQ1_S, Q.IQ1_M, Q.IQ4_NL, Q.IQ4_XS)}


@dataclass(frozen=True)
class MixtureOptions:
    """What a user may change about a K-/I-quant mixture, as llama-quantize's flags do."""

    overrides: tuple[tuple[re.Pattern, Q], ...] = ()  # --tensor-type REGEX=TYPE, first match wins
    output_type: Q | None = None  # --output-tensor-type
    token_embedding_type: Q | None = None  # --token-embedding-type
    allow_fallback: bool = True  # --no-fallback turns a row-size fallback into an error
    imatrix: object | None = None  # an ImportanceMatrix (convert/imatrix_file.py)

    @property
    def customized(self) -> bool:
        return bool(self.overrides or self.output_type or self.token_embedding_type or not self.allow_fallback
                    or self.imatrix is not None)


def parse_type(text: str, option: str) -> Q:
    """A ggml type name as llama-quantize accepts it (case-insensitive: q8_0, Q4_K, iq4_nl, f16)."""
    q = OVERRIDE_TYPES.get(text.strip().lower())
    if q is None:
        raise UsageError(f"{option}: unknown tensor type {text!r} (choose from {', '.join(OVERRIDE_TYPES)})")
    return q


def parse_tensor_type(spec: str) -> tuple[re.Pattern, Q]:
    """--tensor-type REGEX=TYPE; the pattern is lower-cased and searched in the GGUF tensor name,
    as llama-quantize does (e.g. attn_v=q8_0, 'blk\\.[0-3]\\.ffn_down=q6_k')."""
    pattern, sep, qtype = spec.rpartition("=")
    if not sep or not pattern or not qtype:
        raise UsageError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. attn_v=q8_0")
    try:
        rx = re.compile(pattern.lower())
    except re.error as e:
        raise UsageError(f"--tensor-type {spec!r}: bad regular expression ({e})") from None
    return rx, parse_type(qtype, "--tensor-type")


@dataclass
class TypePlan:
    """The chosen type of every tensor, and what the run should report."""

    types: dict[str, Q] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


def plan_types(shapes: dict[str, tuple[int, ...]], kq: KQuant, *, n_head: int, n_head_kv: int, n_expert: int,
               n_layer: int, has_imatrix: bool, overrides: list[tuple[re.Pattern, Q]] = (),
               output_type: Q | None = None, token_embedding_type: Q | None = None) -> TypePlan:
    """Types for GGUF tensors `shapes` (name -> GGUF-order shape: ne0 last) under file type `kq`."""
    plan = TypePlan()
    names = llama_order(list(shapes))
    counters = {"i_attn_v": 0, "i_ffn_down": 0, "i_ffn_gate": 0, "i_ffn_up": 0}
    n_attn_v = sum(category(n) in ATTN_V_LIKE for n in names)
    tied = "output.weight" not in shapes
    is_70b = n_layer == 80 and n_head != n_head_kv
    for name in names:
        shape = shapes[name]
        if not quantizable(name, len(shape)):
            plan.types[name] = Q.F32
            continue
        cat = category(name)
        if token_embedding_type is not None and cat == "token_embd":
            plan.types[name] = token_embedding_type
            continue
        if output_type is not None and cat == "output":
            plan.types[name] = output_type
            continue
        new = kq.default
        manual = next((t for rx, t in overrides if rx.search(name)), None)
        if manual is not None:
            new = manual
        else:
            c = Ctx(kq.name, cat, name, shape[-1], new, n_head // max(1, n_head_kv), n_expert, n_layer, has_imatrix,
                    is_70b, counters["i_attn_v"], n_attn_v)
            if output_type is not None and tied and cat == "token_embd":
                new = output_type
            else:
                new = _evaluate(c, counters, tied)
        plan.types[name] = _fallback(name, shape[-1], new, plan)
    return plan


def plan_mixture(shapes: dict[str, tuple[int, ...]], kq: KQuant, opts: MixtureOptions, *, n_head: int,
                 n_head_kv: int, n_expert: int, n_layer: int) -> TypePlan:
    """plan_types with the user's options; --no-fallback refuses a plan that needs a fallback."""
    plan = plan_types(shapes, kq, n_head=n_head, n_head_kv=n_head_kv, n_expert=n_expert, n_layer=n_layer,
                      has_imatrix=opts.imatrix is not None, overrides=opts.overrides, output_type=opts.output_type,
                      token_embedding_type=opts.token_embedding_type)
    if plan.fallbacks and not opts.allow_fallback:
        raise UsageError(f"--no-fallback: {plan.fallbacks[0]}" + (f" (and {len(plan.fallbacks) - 1} more)"
                                                                   if len(plan.fallbacks) > 1 else ""))
    return plan


def _evaluate(c: Ctx, counters: dict[str, int], tied: bool) -> Q:
    for br in BRANCHES:
        hit = c.cat in br.cats or (br.tied_embd and tied and c.cat == "token_embd")
        if (br.ft is not None and c.ft not in br.ft) or not (hit or (br.ft is not None and not br.cats)):
            continue
        if br.layer_from:
            m = re.match(r"blk\.(\d+)\.", c.name) if c.n_expert > 1 else None
            c.i_layer = int(m.group(1)) if m else counters[br.layer_from]
        for rule in br.rules:
            if rule.applies(c):
                c.new = rule.result(c)
                break
        for rule in br.post:
            if rule.applies(c):
                c.new = rule.result(c)
        if br.counter:
            counters[br.counter] += 1
        return c.new
    return c.new


def _fallback(name: str, ncols: int, qtype: Q, plan: TypePlan) -> Q:
    """tensor_type_fallback: a type whose block does not divide the row falls back (counted)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if ncols % block == 0:
        return qtype
    to = FALLBACK.get(qtype, qtype)
    if ncols % gguf.GGML_QUANT_SIZES[to][0]:
        to = Q.F16
    plan.fallbacks.append(f"{name}: rows of {ncols} do not fit {qtype.name} blocks of {block}, written as {to.name}")
    return to
