"""`mtool extend-vocab`: add tokens to a tokenizer and grow embeddings and lm_head to match.

The Huozi 3.5 recipe: Mixtral's 32000 SentencePiece pieces were extended with 25,000 Chinese
pieces, each new embedding row initialized from the old rows of the pieces the old tokenizer
split it into. Here:

- SentencePiece: new pieces are appended to the model proto as normal pieces (as Chinese-LLaMA
  merged its Chinese model), scored above every existing piece in insertion order, so the
  extended tokenizer prefers them. A new token is only reachable when BPE can build it by
  merges, so the chain of partial concatenations of its old split is added too (reported).
  Tokens the source added after its pieces (chat tokens) keep their text and move after the
  new pieces; unused padding rows are dropped (and re-made with --pad-to-multiple-of).
- Byte-level BPE (tokenizer.json): new vocabulary entries in the byte-level alphabet and the
  merges that build them from their old split, appended after the existing rows.
- Every old id has a new id; embedding and lm_head rows are gathered through that map, so
  old tokens keep their exact rows and text without new tokens computes exactly as before.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import TOKENIZER_FILES, write_hf_checkpoint
from ..convert.canonical import LazyTensor
from ..convert.families import load_canonical
from ..convert.hf_export import hf_config
from ..errors import MtoolError

INITS = ("subword-mean", "mean", "normal")
SPM_SPACE = "\u2581"


@dataclass
class ExtendReport:
    added: list[str] = field(default_factory=list)
    intermediate: list[str] = field(default_factory=list)
    special: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    existing: list[str] = field(default_factory=list)
    old_vocab: int = 0
    new_vocab: int = 0
    padding: int = 0
    out: Path | None = None

    def summary(self) -> str:
        lines = [f"vocab {self.old_vocab} -> {self.new_vocab}: {len(self.added)} tokens added"
                 + (f" (+{len(self.intermediate)} intermediate pieces that make them reachable)" if self.intermediate else "")
                 + (f", {len(self.special)} special" if self.special else "")
                 + (f", {self.padding} padding rows" if self.padding else "")]
        if self.duplicates:
            lines.append(f"skipped {len(self.duplicates)} duplicate(s): {', '.join(self.duplicates[:10])}")
        if self.existing:
            lines.append(f"skipped {len(self.existing)} token(s) already in the vocabulary: {', '.join(self.existing[:10])}")
        return "\n".join(lines)


def read_tokens(path: Path, report: ExtendReport) -> list[str]:
    """One token per line (blank lines ignored); duplicates reported and skipped."""
    if not Path(path).is_file():
        raise MtoolError(f"tokens file {path} not found")
    seen, out = set(), []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        tok = line.strip("\r\n")
        if not tok.strip():
            continue
        if tok in seen:
            report.duplicates.append(tok)
            continue
        seen.add(tok)
        out.append(tok)
    return out


# -- SentencePiece ----------------------------------------------------------------------


@dataclass
class _Plan:
    """New tokenizer files (in a temp dir), old->new id map, new vocab size, init splits."""

    tok_dir: Path
    id_map: dict[int, int]  # old id -> new id, for every old id that keeps a row
    vocab_size: int
    splits: dict[int, list[int]]  # new id -> old ids it is initialized from (subword-mean)
    new_ids: list[int]


def _spm_split(proto_bytes: bytes) -> callable:
    """Old tokenizer without the dummy prefix: how it splits a token in running text."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    p = pb.ModelProto()
    p.ParseFromString(proto_bytes)
    p.normalizer_spec.add_dummy_prefix = False
    sp = spm.SentencePieceProcessor(model_proto=p.SerializeToString())
    return lambda text: sp.encode(text, out_type=int)


def _added_tokens(tok_dir: Path) -> dict[int, tuple[str, bool]]:
    from ..convert.gguf_vocab import _added_tokens as read

    return read(tok_dir)


def _plan_spm(src_tok: Path, tokens: list[str], sp_model: Path | None, specials: list[str],
              report: ExtendReport, work: Path) -> _Plan:
    from sentencepiece import sentencepiece_model_pb2 as pb

    raw = (src_tok / "tokenizer.model").read_bytes()
    proto = pb.ModelProto()
    proto.ParseFromString(raw)
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        raise MtoolError("only BPE SentencePiece models can be extended (the Llama family's kind)")
    n_pieces = len(proto.pieces)
    existing = {p.piece: i for i, p in enumerate(proto.pieces)}
    added_old = {i: t for i, t in _added_tokens(src_tok).items() if i >= n_pieces}
    split_old = _spm_split(raw)
    if sp_model is not None:
        other = pb.ModelProto()
        try:
            other.ParseFromString(Path(sp_model).read_bytes())
        except Exception as e:
            raise MtoolError(f"cannot read SentencePiece model {sp_model}: {e}") from None
        tokens = [p.piece.replace(SPM_SPACE, " ") for p in other.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL]
    texts_taken = set(existing) | {t for t, _ in added_old.values()}
    wanted: list[str] = []
    for tok in tokens:
        piece = tok.replace(" ", SPM_SPACE)
        if piece in texts_taken or piece in wanted:
            if sp_model is None:
                report.existing.append(tok)
            continue
        wanted.append(piece)
    for s in specials:
        if s in texts_taken or s in wanted:
            raise MtoolError(f"special token {s!r} is already in the vocabulary")
    # chains of partial concatenations of each token's old split make it reachable by BPE merges
    new_pieces: list[str] = []
    splits_text: dict[str, list[int]] = {}
    for piece in wanted:
        old_ids = split_old(piece.replace(SPM_SPACE, " "))
        splits_text[piece] = old_ids
        parts = [proto.pieces[i].piece for i in old_ids]
        acc = parts[0] if parts else ""
        for part in parts[1:-1]:
            acc += part
            if acc not in existing and acc not in splits_text and acc not in new_pieces:
                new_pieces.append(acc)
                splits_text[acc] = split_old(acc.replace(SPM_SPACE, " "))
                report.intermediate.append(acc.replace(SPM_SPACE, " "))
        if piece not in new_pieces:
            new_pieces.append(piece)
            report.added.append(piece.replace(SPM_SPACE, " "))
    top = max((p.score for p in proto.pieces), default=0.0)
    for k, piece in enumerate(new_pieces):
        p = proto.pieces.add()
        p.piece = piece
        p.score = top + float(len(new_pieces) - k)  # above every old piece, earlier ones first
        p.type = pb.ModelProto.SentencePiece.NORMAL
    n_new = len(proto.pieces)
    id_map = {i: i for i in range(n_pieces)}
    new_ids = list(range(n_pieces, n_new))
    splits = {n_pieces + k: splits_text[piece] for k, piece in enumerate(new_pieces)}
    added_list = [(t, special) for _, (t, special) in sorted(added_old.items())]
    for j, old_id in enumerate(sorted(added_old)):
        id_map[old_id] = n_new + j
    added_list += [(s, True) for s in specials]
    report.special = list(specials)
    first_special = n_new + len(added_old)
    new_ids += list(range(first_special, first_special + len(specials)))
    vocab = n_new + len(added_list)
    # tokenizer files: the new model, then the added tokens re-applied through transformers
    work.mkdir(parents=True, exist_ok=True)
    (work / "tokenizer.model").write_bytes(proto.SerializeToString())
    tc_path = src_tok / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    for key in ("added_tokens_decoder", "auto_map", "additional_special_tokens", "extra_special_tokens"):
        tc.pop(key, None)
    tc["tokenizer_class"] = "LlamaTokenizer"
    tc["add_bos_token"], tc["add_eos_token"] = _adds_bos_eos(src_tok)
    (work / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    for fname in ("generation_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (src_tok / fname).is_file() and fname != "special_tokens_map.json":
            shutil.copy2(src_tok / fname, work / fname)
    if added_list:
        from tokenizers import AddedToken
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(work))
        for text, special in added_list:
            t = AddedToken(text, special=special, normalized=False)
            (tok.add_special_tokens({"additional_special_tokens": [t]}, replace_extra_special_tokens=False)
             if special else tok.add_tokens([t]))
        tok.save_pretrained(str(work))
        (work / "tokenizer.model").write_bytes(proto.SerializeToString())
        for i, (text, _) in enumerate(added_list):
            got = tok.convert_tokens_to_ids(text)
            if got != n_new + i:
                raise MtoolError(f"internal: added token {text!r} got id {got}, expected {n_new + i}")
    return _Plan(work, id_map, vocab, splits, new_ids)


def _adds_bos_eos(tok_dir: Path) -> tuple[bool, bool]:
    """Whether the source HF tokenizer adds BOS / EOS, observed (configs saved by different
    transformers versions keep this in different places, or only in tokenizer.json)."""
    from ..tokenizer import open_tokenizer

    tok = open_tokenizer(tok_dir)
    ids = tok("a")["input_ids"]
    bos = tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id
    eos = tok.eos_token_id is not None and bool(ids) and ids[-1] == tok.eos_token_id
    return bos, eos


# -- byte-level BPE ------------------------------------------------------------------------


def _plan_bpe(src_tok: Path, tokens: list[str], specials: list[str], old_vocab: int,
              report: ExtendReport, work: Path) -> _Plan:
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tj = json.loads((src_tok / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise MtoolError(f"{src_tok}/tokenizer.json: only BPE tokenizers can be extended")
    byte_enc = bytes_to_unicode()
    byte_dec = {v: k for k, v in byte_enc.items()}
    old = Tokenizer.from_file(str(src_tok / "tokenizer.json"))
    vocab: dict[str, int] = model["vocab"]
    added_texts = {t["content"] for t in tj.get("added_tokens", [])}
    merges = model.get("merges", [])
    pair_style = bool(merges) and isinstance(merges[0], list)
    next_id = old_vocab
    splits: dict[int, list[int]] = {}
    new_ids: list[int] = []
    for tok in tokens:
        enc = "".join(byte_enc[b] for b in tok.encode("utf-8"))
        if enc in vocab or tok in added_texts:
            report.existing.append(tok)
            continue
        old_ids = old.encode(tok, add_special_tokens=False).ids
        acc, acc_ids = old.id_to_token(old_ids[0]), old_ids[:1]
        for i in old_ids[1:]:
            part = old.id_to_token(i)
            merged, acc_ids = acc + part, acc_ids + [i]
            merges.append([acc, part] if pair_style else f"{acc} {part}")
            if merged not in vocab:
                vocab[merged] = next_id
                splits[next_id] = list(acc_ids)  # the old pieces this (partial) token is made of
                new_ids.append(next_id)
                if merged == enc:
                    report.added.append(tok)
                else:
                    report.intermediate.append(bytes(byte_dec[c] for c in merged).decode("utf-8", "replace"))
                next_id += 1
            acc = merged
    for s in specials:
        if s in added_texts or s in vocab:
            raise MtoolError(f"special token {s!r} is already in the vocabulary")
        tj.setdefault("added_tokens", []).append({"id": next_id, "content": s, "single_word": False, "lstrip": False,
                                                 "rstrip": False, "normalized": False, "special": True})
        new_ids.append(next_id)
        report.special.append(s)
        next_id += 1
    model["vocab"], model["merges"] = vocab, merges
    work.mkdir(parents=True, exist_ok=True)
    for fname in TOKENIZER_FILES:
        if (src_tok / fname).is_file() and fname not in ("tokenizer.json", "generation_config.json"):
            shutil.copy2(src_tok / fname, work / fname)
    (work / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    if specials and (work / "tokenizer_config.json").is_file():
        tc = json.loads((work / "tokenizer_config.json").read_text(encoding="utf-8"))
        dec = tc.setdefault("added_tokens_decoder", {})
        for t in tj["added_tokens"]:
            dec.setdefault(str(t["id"]), {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")})
        (work / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    return _Plan(work, {i: i for i in range(old_vocab)}, next_id, splits, new_ids)


# -- rows ------------------------------------------------------------------------------------


def _grow(old: torch.Tensor, plan: _Plan, init: str, gen: torch.Generator) -> torch.Tensor:
    """Rows of the new matrix: old rows through the id map, new rows initialized, padding = mean."""
    f = old.to(torch.float32)
    mean = f.mean(dim=0)
    out = mean.repeat(plan.vocab_size, 1)
    for o, n in plan.id_map.items():
        out[n] = f[o]
    std = f.std(dim=0)
    for n in plan.new_ids:
        split = plan.splits.get(n) or []
        if init == "subword-mean" and split:
            out[n] = f[split].mean(dim=0)
        elif init == "normal":
            out[n] = mean + std * torch.randn(f.shape[1], generator=gen)
        else:
            out[n] = mean
    return out.to(old.dtype)


def extend_vocab(src: Path, out: Path, *, tokens_file: Path | None = None, sp_model: Path | None = None,
                 specials: tuple[str, ...] = (), init: str = "subword-mean", pad_to_multiple_of: int = 0,
                 seed: int = 0, force: bool = False, progress: bool = True) -> ExtendReport:
    """Write `src` with an extended tokenizer and grown embeddings/lm_head to `out`."""
    from ..outputs import check_output_path

    if init not in INITS:
        raise MtoolError(f"unknown --init {init!r} (choose from {', '.join(INITS)})")
    if (tokens_file is None) == (sp_model is None) and not specials:
        raise MtoolError("give exactly one of --tokens or --sp-model (or only --special tokens)")
    if tokens_file is not None and sp_model is not None:
        raise MtoolError("give --tokens or --sp-model, not both")
    if pad_to_multiple_of < 0:
        raise MtoolError("--pad-to-multiple-of must be positive")
    src, out = Path(src), Path(out)
    check_output_path(out, force=force, sources=[src])
    model = load_canonical(src)
    report = ExtendReport(old_vocab=model.vocab_size)
    tokens = read_tokens(tokens_file, report) if tokens_file is not None else []
    with tempfile.TemporaryDirectory(prefix="mtool-vocab-") as tmp:
        work = Path(tmp) / "tok"
        if (model.tokenizer_dir / "tokenizer.model").is_file():
            plan = _plan_spm(model.tokenizer_dir, tokens, sp_model, list(specials), report, work)
        elif (model.tokenizer_dir / "tokenizer.json").is_file():
            if sp_model is not None:
                raise MtoolError("--sp-model needs a SentencePiece source tokenizer (tokenizer.model)")
            plan = _plan_bpe(model.tokenizer_dir, tokens, list(specials), model.vocab_size, report, work)
        else:
            raise MtoolError(f"{src} has no tokenizer.model or tokenizer.json to extend")
        if not plan.new_ids:
            raise MtoolError("nothing to add: every token is already in the vocabulary")
        if pad_to_multiple_of:
            padded = -(-plan.vocab_size // pad_to_multiple_of) * pad_to_multiple_of
            report.padding = padded - plan.vocab_size
            plan.vocab_size = padded
        report.new_vocab = plan.vocab_size
        gen = torch.Generator().manual_seed(seed)
        grown = {"model.embed_tokens.weight", "lm_head.weight"}
        tensors = []
        for t in model.tensors:
            if t.name in grown:
                shape = (plan.vocab_size, t.shape[1])
                tensors.append(LazyTensor(t.name, shape, t.dtype, lambda t=t: _grow(t.load(), plan, init, gen)))
            else:
                tensors.append(t)
        model.config["vocab_size"] = plan.vocab_size
        config = hf_config(model)
        config["vocab_size"] = plan.vocab_size
        report.out = write_hf_checkpoint(out, config, tensors, copy_from=plan.tok_dir, force=force,
                                         sources=(src,), progress=progress)
    return report
