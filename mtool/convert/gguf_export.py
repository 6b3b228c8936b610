"""Canonical model -> GGUF (llama.cpp), streamed one tensor at a time, written atomically.

The plan (names, types, sizes, split points) is made from shapes alone, so the header is
written first and tensor data follows in order: only the tensor being encoded (and the
one prefetched) is ever in memory.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

from ..buffers import Recycler
from ..dtypes import FLOATS, DType, as_dtype, to_storage
from ..errors import InputError, MtoolError, UsageError
from ..model import experts
from ..model.canonical import CanonicalModel, LazyTensor, rope_settings
from ..numerics import F16_MAX, check_finite
from ..outputs import check_output_path, output_transaction
from .gguf_types import OUTTYPES, Q, choose_qtype, encode, encoded_nbytes
from .gguf_vocab import apply_recipe, build_vocab
from .gguf_write import (GGUFResult, commit_gguf, new_writer, progress_bar, row_pieces, shard_paths, type_counts,
                         write_header)
from .imatrix_file import add_imatrix_metadata, importances_for
from .quant_policy import KQUANTS, MixtureOptions, plan_mixture

PREPARE_WORKERS = 2  # pieces encoded concurrently (each holds one piece in memory)
INFLIGHT_BYTES = 256 * 2**20  # encoded bytes queued ahead of the writer


@dataclass
class PlannedTensor:
    """One GGUF tensor: a single canonical tensor, or several stacked along a new first dim."""

    gguf_name: str
    shape: tuple[int, ...]
    qtype: Q
    nbytes: int
    parts: list[LazyTensor]

    @property
    def stacked(self) -> bool:
        return len(self.shape) == len(self.parts[0].shape) + 1


def _unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs (inverse of HF's conversion permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rotary_heads(model: CanonicalModel, name: str) -> int:
    """Heads whose rows llama.cpp's layout reorders in tensor `name` (0: none)."""
    if not model.spec.permute_qk:
        return 0
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return model.n_heads
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return model.n_kv_heads
    return 0


def _transform(model: CanonicalModel, lt: LazyTensor, t: np.ndarray) -> np.ndarray:
    """`t` (all rows of `lt`, or a piece of whole heads) in llama.cpp's layout."""
    heads = _rotary_heads(model, lt.name)
    if not heads:
        return t
    return _unpermute_rotary(t, t.shape[0] // (lt.shape[0] // heads))  # rows move only within their head


def plan_tensors(model: CanonicalModel, outtype: str,
                 mixture: MixtureOptions | None = None) -> tuple[list[PlannedTensor], list[str]]:
    """GGUF name, type and size of every tensor, from shapes alone; and the row-size fallbacks."""
    ot = OUTTYPES[outtype]
    name_map = _name_map(model.spec.gguf_arch, model.n_layers)
    planned: list[PlannedTensor] = []
    stacks: dict[str, PlannedTensor] = {}
    for lt in model.tensors:
        if lt.synthetic:
            continue  # llama.cpp treats absent biases as zero
        at = experts.split_layer(lt.name)
        ew = experts.parse(at[1]) if at and lt.name.endswith(".weight") else None
        if ew:
            layer, (expert, w) = at[0], ew
            gname = experts.gguf_stack(layer, w)
            if gname not in stacks:
                stacks[gname] = PlannedTensor(gname, lt.shape, Q.F32, 0, [])
                planned.append(stacks[gname])
            if expert != len(stacks[gname].parts):
                raise MtoolError(f"expert tensors of layer {layer} are out of order at {lt.name}")
            stacks[gname].parts.append(lt)
            continue
        gname = name_map.get_name(lt.name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise MtoolError(f"no GGUF name for tensor {lt.name}")
        planned.append(PlannedTensor(gname, lt.shape, Q.F32, 0, [lt]))
    freqs = llama3_rope_factors(model)
    if freqs is not None:  # llama.cpp's converter writes it before the model's tensors
        planned.insert(0, PlannedTensor(ROPE_FREQS, tuple(freqs.shape), Q.F32, 0,
                                        [LazyTensor("rope_freqs", tuple(freqs.shape), "float32", lambda: freqs)]))
    notes = []
    for p in planned:
        if p.gguf_name in stacks:
            p.shape = (len(p.parts), *p.parts[0].shape)
    mix = None
    if ot.mixture:
        mix = plan_mixture({p.gguf_name: p.shape for p in planned}, KQUANTS[outtype], mixture or MixtureOptions(),
                           n_head=model.n_heads, n_head_kv=model.n_kv_heads,
                           n_expert=model.n_experts, n_layer=model.n_layers)
        notes += mix.fallbacks
    elif mixture is not None and mixture.customized:
        raise UsageError(f"--imatrix, --tensor-type, --output-tensor-type, --token-embedding-type and --no-fallback "
                         f"apply to the K-/I-quant types, not to --outtype {outtype}")
    for p in planned:
        if mix is not None:
            p.qtype = mix.types[p.gguf_name]
        else:
            p.qtype, note = choose_qtype(p.gguf_name, p.shape, ot, tied=model.tied)
            if note:
                notes.append(note)
        p.nbytes = encoded_nbytes(p.shape, p.qtype)
    return planned, notes


ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"


def llama3_rope_factors(model: CanonicalModel):
    """Llama 3 rope scaling (`rope_type: llama3`) as llama.cpp expects it: no metadata, a
    `rope_freqs` tensor of per-frequency divisors, computed exactly as its converter does
    (conversion/llama.py, generate_extra_tensors), so the files are the same."""
    theta, scaling = rope_settings(model.config)
    if not scaling or str(scaling.get("rope_type", scaling.get("type", ""))).lower() != "llama3":
        return None
    import torch  # float32 arithmetic exactly as the converter's, op for op

    dim = model.head_dim
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)  # a torch tensor: the LazyTensor's load()


@lru_cache(maxsize=8)
def _name_map(arch: str, n_layers: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch], n_layers)


def gguf_name(model: CanonicalModel, canonical: str) -> str:
    """GGUF name of a (non-expert) canonical tensor."""
    name = _name_map(model.spec.gguf_arch, model.n_layers).get_name(canonical, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise MtoolError(f"no GGUF name for tensor {canonical}")
    return name


# GGUF hparams some architectures have beyond the common ones (ArchSpec.gguf_extra), as llama.cpp's converter writes them
EXTRA_HPARAMS = {
    "vocab_size": lambda w, m: w.add_vocab_size(m.vocab_size),
    "rope_dimension_count": lambda w, m: w.add_rope_dimension_count(m.head_dim),
}


def _add_metadata(w: gguf.GGUFWriter, model: CanonicalModel, outtype: str, name: str) -> None:
    cfg = model.config
    ot = OUTTYPES[outtype]
    w.add_name(name)
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(model.hidden)
    w.add_block_count(model.n_layers)
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(model.n_heads)
    w.add_head_count_kv(model.n_kv_heads)
    for key in model.spec.gguf_extra:
        EXTRA_HPARAMS[key](w, model)
    if "head_dim" in cfg or model.head_dim != model.hidden // model.n_heads:  # as llama.cpp's converter
        w.add_key_length(model.head_dim)
        w.add_value_length(model.head_dim)
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    theta, scaling = rope_settings(cfg)
    w.add_rope_freq_base(theta)
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(scaling["factor"]))
        elif str(kind).lower() == "llama3":
            pass  # the rope_freqs tensor carries it (llama3_rope_factors)
        elif kind == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(scaling["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        else:
            raise UsageError(f"rope scaling type {kind!r} in config.json is not supported for GGUF yet "
                             f"(supported: linear, yarn, llama3)")
    if model.moe:
        w.add_expert_count(model.n_experts)
        w.add_expert_used_count(model.n_experts_used)
    w.add_file_type(ot.file_type)
    if gguf.GGML_QUANT_SIZES[ot.qtype][0] > 1:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _read(lt: LazyTensor, rows: tuple[int, int] | None = None,
          recycler: Recycler | None = None) -> tuple[np.ndarray, DType]:
    """A canonical tensor's values (or `rows` = (start, count) of them, through its row reader,
    into a recycled buffer) as numpy storage: through its torch-free reader when it has one."""
    dtype = lt.dtype
    if rows is not None:
        start, count = rows
        buf = recycler.take(count * lt.shape[-1] * dtype.itemsize) if recycler is not None else None
        a = lt.rows(start, count, buf)
        if buf is not None and not np.may_share_memory(a, buf):
            recycler.give(buf)  # read elsewhere (a .bin checkpoint's rows): free again
        shape = (count, lt.shape[-1])
    elif lt.array is not None:
        a, shape = lt.array(), lt.shape
    else:
        t = lt.load()
        dtype = as_dtype(t.dtype)
        a, shape = to_storage(t, dtype) if dtype in FLOATS else None, lt.shape
    if dtype not in FLOATS:
        raise MtoolError(f"tensor {lt.name} has dtype {dtype}; only f32/f16/bf16 sources are supported")
    if a.dtype != dtype.np_storage:
        raise MtoolError(f"tensor {lt.name}: read {a.dtype} values, expected {dtype}")
    if tuple(a.shape) != tuple(shape):
        raise MtoolError(f"tensor {lt.name}: read shape {list(a.shape)}, header said {list(shape)}")
    return a, dtype


@dataclass
class _Piece:
    """One unit of encoding work, written in order: a whole tensor, one expert of a stacked tensor
    (expert after expert, so a stack is never assembled in memory), or rows of either."""

    tensor: PlannedTensor
    index: int  # part index within the tensor
    rows: tuple[int, int] | None  # (start, count) of the part's rows; None: all of it
    nbytes: int  # encoded bytes
    imp: np.ndarray | None
    first: bool = False  # the tensor's first piece
    last: bool = False  # its last


def _piece_rows(model: CanonicalModel, lt: LazyTensor) -> list[tuple[int, int]] | None:
    """Row ranges of about gguf_write.PIECE_BYTES for a matrix that can be read in rows (one range when it
    is small: the rows reader reads into recycled buffers, where a fresh array costs a page fault and a
    page of zeros per 4 KB); None: read it whole."""
    if lt.rows is None or len(lt.shape) < 2 or not lt.numel:
        return None
    n_rows, row_bytes = lt.numel // lt.shape[-1], lt.shape[-1] * lt.dtype.itemsize
    heads = _rotary_heads(model, lt.name)
    return row_pieces(n_rows, row_bytes, align=n_rows // heads if heads else 1)  # q/k: rows move within a head


def _pieces(model: CanonicalModel, planned: list[PlannedTensor], imps: dict[str, np.ndarray]) -> list[_Piece]:
    out = []
    for p in planned:
        imp, n, k = imps.get(p.gguf_name), p.shape[-1], len(p.parts)
        mine = []
        for i, lt in enumerate(p.parts):  # each expert quantized with its own slice of importances
            sl = imp if imp is None or not p.stacked else imp[i * n : (i + 1) * n]
            ranges = _piece_rows(model, lt)
            if ranges is None:
                mine.append(_Piece(p, i, None, p.nbytes // k, sl))
            else:
                mine += [_Piece(p, i, r, encoded_nbytes((r[1], n), p.qtype), sl) for r in ranges]
        if sum(x.nbytes for x in mine) != p.nbytes:
            raise MtoolError(f"{p.gguf_name}: pieces of {sum(x.nbytes for x in mine)} bytes, planned {p.nbytes}")
        mine[0].first = mine[-1].last = True
        out += mine
    return out


def _prepare_piece(model: CanonicalModel, piece: _Piece, recycler: Recycler | None = None) -> np.ndarray:
    """Read, check and encode one piece; its GGUF bytes."""
    lt, qtype = piece.tensor.parts[piece.index], piece.tensor.qtype
    alloc = recycler.take if recycler is not None else None
    a, dtype = _read(lt, piece.rows, recycler)
    amax = check_finite(a, lt.name, dtype)
    if qtype == Q.F16 and amax > F16_MAX:
        raise InputError(f"tensor {lt.name} has values up to {amax:.3g}, beyond float16; use --outtype bf16 or f32")
    data = encode(_transform(model, lt, a), dtype, qtype, name=lt.name, imatrix=piece.imp, alloc=alloc)
    if recycler is not None and data is not a:
        recycler.give(a)  # encoded from: reusable (the writer gives back `data` once written)
    return data


def export_gguf(
    model: CanonicalModel,
    out: Path,
    *,
    outtype: str = "f16",
    split_max_size: int = 0,
    force: bool = False,
    name: str | None = None,
    progress: bool = True,
    recipe=None,
    mixture: MixtureOptions | None = None,
) -> GGUFResult:
    """Write `model` as GGUF at `out` (or as split shards next to it). `mixture`: the options
    of a K-/I-quant --outtype (importance matrix, per-tensor overrides, fallbacks)."""
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown --outtype {outtype!r} (choose from {', '.join(OUTTYPES)})")
    out = Path(out)
    if out.suffix != ".gguf":
        raise UsageError(f"GGUF output {out} must end in .gguf")
    old_shards = shard_paths(out)
    sources = [model.source, model.tokenizer_dir]
    check_output_path(out, force=force, sources=sources, related=old_shards)
    t0 = time.perf_counter()
    planned, fallbacks = plan_tensors(model, outtype, mixture)
    imatrix = mixture.imatrix if mixture else None
    imps: dict[str, np.ndarray] = {}
    im_notes: list[str] = []
    if OUTTYPES[outtype].mixture:
        imps, im_notes = importances_for(imatrix, {p.gguf_name: (p.shape, p.qtype) for p in planned}, outtype)
    vocab = build_vocab(model.tokenizer_dir, model.vocab_size)
    if recipe is not None:
        recipe.check_family(model.family)
        apply_recipe(vocab, recipe)
    notes = model.notes + vocab.notes + im_notes
    total_out = sum(p.nbytes for p in planned)
    n_files = 1 if not split_max_size else max(1, -(-total_out // split_max_size)) + 1
    needed = total_out + vocab.nbytes_estimate() + 96 * len(planned) + 64 * 1024 * n_files

    with output_transaction(out, force=force, sources=sources, related=old_shards, needed_bytes=needed) as tx:
        tmp = tx.dir
        w = new_writer(tmp / out.name, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[model.spec.gguf_arch]],
                            split_max_size=split_max_size)
        _add_metadata(w, model, outtype, name or model.source.name)
        add_provenance(w, getattr(recipe, "provenance", None))
        vocab.add_to(w)
        if imatrix is not None:
            add_imatrix_metadata(w, imatrix)
        tensor_data = write_header(w, [(p.gguf_name, p.shape, p.qtype) for p in planned])
        bar = progress_bar(total_out, progress)
        # Tensors are read, checked and encoded by worker threads (numpy and libggml release
        # the GIL) while the main thread writes, in order, what they finished: on small
        # machines the write and the encoding then share the cores instead of taking turns.
        n_workers = max(1, min(PREPARE_WORKERS, os.cpu_count() or 1))
        torch = sys.modules.get("torch")  # imported only when a tensor needs arithmetic (TeleChat muP, .bin)
        torch_threads = torch.get_num_threads() if torch else 0
        if torch:
            torch.set_num_threads(max(1, torch_threads // n_workers))
        try:
            with tensor_data, ThreadPoolExecutor(max_workers=n_workers) as pool:
                # Work is queued ahead while it fits a byte budget, in pieces of rows (stacked expert
                # tensors expert by expert), so a few pieces are in memory at once, whatever the tensor.
                todo = deque(_pieces(model, planned, imps))
                recycler = Recycler(keep=2 * (n_workers + 1))  # pieces read and encoded ahead, in and out
                budget = max(INFLIGHT_BYTES, max(piece.nbytes for piece in todo))
                ahead: deque = deque()
                inflight = 0

                def fill() -> None:
                    nonlocal inflight
                    while todo and len(ahead) <= n_workers and (not ahead or inflight + todo[0].nbytes <= budget):
                        piece = todo.popleft()
                        inflight += piece.nbytes
                        ahead.append((piece, pool.submit(_prepare_piece, model, piece, recycler)))

                fill()
                while ahead:
                    piece, fut = ahead.popleft()
                    data = fut.result()
                    tensor_data.piece(data, first=piece.first, last=piece.last)
                    recycler.give(data)
                    del data
                    inflight -= piece.nbytes
                    fill()
                    if bar:
                        bar.update(piece.nbytes)
        finally:
            if torch:
                torch.set_num_threads(torch_threads)
        if bar:
            bar.close()
        files = commit_gguf(tmp, out, old_shards, force)

    counts = type_counts(p.qtype for p in planned)
    return GGUFResult(
        files=files, n_tensors=len(planned), bytes_out=total_out,
        seconds=time.perf_counter() - t0, type_counts=counts, notes=notes, n_params=model.n_params(),
        fallbacks=fallbacks,
    )


def add_provenance(w: gguf.GGUFWriter, p) -> None:
    """A recipe's provenance as the general.* keys llama.cpp's converter writes from a model card."""
    if p is None:
        return
    if p.base_model:
        org, _, base = p.base_model.rpartition("/")
        w.add_base_model_count(1)
        w.add_base_model_name(0, base)
        if org:
            w.add_base_model_organization(0, org)
        if p.url:
            w.add_base_model_repo_url(0, p.url)
    if p.url:
        w.add_source_url(p.url)
    if p.quantized_by:
        w.add_quantized_by(p.quantized_by)
    if p.license:
        w.add_license(p.license)
    if p.tags:
        w.add_tags(list(p.tags))
    if p.languages:
        w.add_languages(list(p.languages))
