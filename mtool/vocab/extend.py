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
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..convert.gguf_vocab import _added_tokens, is_sentencepiece_json, merge_pairs
from ..convert.hf_export import hf_config
from ..errors import InputError, MtoolError, UsageError
from ..model.canonical import LazyTensor
from ..model.checkpoint import TOKENIZER_FILES, read_json, write_hf_checkpoint
from ..model.families import load_canonical
from ..model.tokenizer import SPM_TOKENIZER_CLASS, open_tokenizer
from ..outputs import check_output_path

INITS = ("subword-mean", "mean", "normal")
_BYTE_TEXT = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPM_SPACE = "\u2581"


@dataclass
class ExtendReport:
    added: list[str] = field(default_factory=list)
    intermediate: list[str] = field(default_factory=list)
    characters: list[str] = field(default_factory=list)  # characters the old vocabulary lacked
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
                 + (f" (+{len(self.characters)} characters the old vocabulary lacked)" if self.characters else "")
                 + (f", {len(self.special)} special" if self.special else "")
                 + (f", {self.padding} padding rows" if self.padding else "")]
        if self.duplicates:
            lines.append(f"skipped {len(self.duplicates)} duplicate(s): {', '.join(self.duplicates[:10])}")
        if self.existing:
            lines.append(f"skipped {len(self.existing)} token(s) already in the vocabulary: {', '.join(self.existing[:10])}")
        return "\n".join(lines)


# Longer "tokens" are sentences, not vocabulary: each would add a chain of up to this many
# intermediate pieces (a 5,000-character line once grew a 700-piece vocabulary to 4,451).
MAX_TOKEN_CHARS = 32


def read_tokens(path: Path, report: ExtendReport) -> list[str]:
    """One token per line (blank lines ignored); duplicates reported and skipped.

    Refused, naming the line: control characters, tokens over MAX_TOKEN_CHARS characters, a
    file that is not UTF-8 text or holds no token."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"tokens file {path} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"tokens file {path} is not UTF-8 text (byte {e.start})") from None
    if "\x00" in text:
        raise InputError(f"tokens file {path} is binary, not one token per line")
    seen, out = set(), []
    for n, line in enumerate(text.split("\n"), start=1):
        tok = line.removesuffix("\r")
        if not tok.strip():
            continue
        bad = next((c for c in tok if unicodedata.category(c) in ("Cc", "Cs")), None)
        if bad is not None:
            raise InputError(f"tokens file {path} line {n}: token {tok[:20]!r} contains control character "
                             f"U+{ord(bad):04X}")
        if len(tok) > MAX_TOKEN_CHARS:
            raise InputError(f"tokens file {path} line {n}: token of {len(tok)} characters is longer than "
                             f"{MAX_TOKEN_CHARS}; a vocabulary token is a word or phrase, not a sentence")
        if tok in seen:
            report.duplicates.append(tok)
            continue
        seen.add(tok)
        out.append(tok)
    if not out:
        raise InputError(f"tokens file {path} holds no tokens (one per line)")
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
    # Characters the old vocabulary lacks become pieces themselves (the old model spells them
    # in byte tokens, which no merge can join into a piece); then every token is split by a
    # model that knows them, and the chain of partial concatenations of that split makes the
    # token reachable by BPE merges. No piece ever contains byte-token text.
    new_chars = list(dict.fromkeys(c for piece in wanted for c in piece if c not in existing))
    lowest = min((p.score for p in proto.pieces), default=0.0)
    aug = pb.ModelProto()
    aug.CopyFrom(proto)
    for k, ch in enumerate(new_chars):
        p = aug.pieces.add()
        p.piece, p.score, p.type = ch, lowest - 1.0 - k, pb.ModelProto.SentencePiece.NORMAL
    split_aug = _spm_split(aug.SerializeToString())
    new_pieces: list[str] = []
    splits_text: dict[str, list[int]] = {}
    for ch in new_chars:
        splits_text[ch] = split_old(ch)  # its byte tokens: their rows initialize the character's row
        report.characters.append(ch)
    known = set(existing) | set(new_chars)
    for piece in wanted:
        parts = [aug.pieces[i].piece for i in split_aug(piece.replace(SPM_SPACE, " "))]
        splits_text[piece] = split_old(piece.replace(SPM_SPACE, " "))
        acc = parts[0] if parts else ""
        for part in parts[1:-1]:
            acc += part
            if acc not in known and acc not in new_pieces:
                new_pieces.append(acc)
                splits_text[acc] = split_old(acc.replace(SPM_SPACE, " "))
                report.intermediate.append(acc.replace(SPM_SPACE, " "))
        if piece in new_chars:
            report.added.append(piece.replace(SPM_SPACE, " "))  # a one-character token: the character itself
        elif piece not in new_pieces and piece not in known:
            new_pieces.append(piece)
            report.added.append(piece.replace(SPM_SPACE, " "))
    for piece in new_pieces + new_chars:
        if _BYTE_TEXT.search(piece):
            raise MtoolError(f"internal: new piece {piece!r} holds byte-token text")
    top = max((p.score for p in proto.pieces), default=0.0)
    for k, piece in enumerate(new_pieces):
        p = proto.pieces.add()
        p.piece = piece
        p.score = top + float(len(new_pieces) - k)  # above every old piece, earlier ones first
        p.type = pb.ModelProto.SentencePiece.NORMAL
    for k, ch in enumerate(new_chars):  # single characters are never merge results: score unused
        p = proto.pieces.add()
        p.piece, p.score, p.type = ch, lowest - 1.0 - k, pb.ModelProto.SentencePiece.NORMAL
    all_new = new_pieces + new_chars
    n_new = len(proto.pieces)
    id_map = {i: i for i in range(n_pieces)}
    new_ids = list(range(n_pieces, n_new))
    splits = {n_pieces + k: splits_text[piece] for k, piece in enumerate(all_new)}
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
    tc["tokenizer_class"] = SPM_TOKENIZER_CLASS
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
    next_id = _add_json_specials(tj, specials, added_texts | set(vocab), next_id, new_ids, report)
    model["vocab"], model["merges"] = vocab, merges
    _write_json_tokenizer(src_tok, tj, bool(specials), work)
    return _Plan(work, {i: i for i in range(old_vocab)}, next_id, splits, new_ids)


# -- SentencePiece-style tokenizer.json (no tokenizer.model) ------------------------------------


def _plan_spm_json(src_tok: Path, tj: dict, tokens: list[str], specials: list[str], old_vocab: int,
                   report: ExtendReport, work: Path) -> _Plan:
    """The same extension as `_plan_spm`, on tokenizer.json's '▁'-escaped BPE: missing characters
    become vocabulary entries, each token gets the merge chain of its split, and the new merges
    go first (highest priority), as the new pieces score above every old one in `_plan_spm`.
    llama.cpp then agrees, because GGUF scores are derived from the merge order."""
    from tokenizers.models import BPE


    model = tj["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    pairs = merge_pairs(model.get("merges") or [])
    pair_style = bool(model.get("merges")) and not isinstance(model["merges"][0], str)
    unk = model.get("unk_token")

    def bpe(v: dict[str, int]):
        return BPE(vocab=v, merges=pairs, byte_fallback=True, unk_token=unk, fuse_unk=bool(model.get("fuse_unk")))

    old = bpe(vocab)
    added_texts = {t["content"] for t in tj.get("added_tokens", [])}
    wanted: list[str] = []
    for tok in tokens:
        piece = tok.replace(" ", SPM_SPACE)
        if piece in vocab or tok in added_texts or piece in wanted:
            report.existing.append(tok)
            continue
        wanted.append(piece)
    next_id = old_vocab
    splits: dict[int, list[int]] = {}
    new_ids: list[int] = []
    new_chars = list(dict.fromkeys(c for piece in wanted for c in piece if c not in vocab))
    for ch in new_chars:
        vocab[ch] = next_id
        splits[next_id] = [t.id for t in old.tokenize(ch)]
        new_ids.append(next_id)
        report.characters.append(ch)
        next_id += 1
    aug = bpe(vocab)
    new_merges: list[tuple[str, str]] = []
    for piece in wanted:
        parts = [t.value for t in aug.tokenize(piece)]
        acc = parts[0]
        for part in parts[1:]:
            merged = acc + part
            if (acc, part) not in new_merges:
                new_merges.append((acc, part))
            if merged not in vocab:
                vocab[merged] = next_id
                splits[next_id] = [t.id for t in old.tokenize(merged)]
                new_ids.append(next_id)
                (report.added if merged == piece else report.intermediate).append(merged.replace(SPM_SPACE, " "))
                next_id += 1
            acc = merged
        if piece in new_chars:
            report.added.append(piece.replace(SPM_SPACE, " "))
    merges = new_merges + pairs
    model["vocab"] = vocab
    model["merges"] = [list(m) for m in merges] if pair_style else [f"{a} {b}" for a, b in merges]
    next_id = _add_json_specials(tj, specials, added_texts | set(vocab), next_id, new_ids, report)
    _write_json_tokenizer(src_tok, tj, bool(specials), work)
    return _Plan(work, {i: i for i in range(old_vocab)}, next_id, splits, new_ids)


def _add_json_specials(tj: dict, specials: list[str], taken: set[str], next_id: int, new_ids: list[int],
                       report: ExtendReport) -> int:
    """Append `specials` to tokenizer.json's added tokens from id `next_id`; returns the next free id."""
    for s in specials:
        if s in taken:
            raise MtoolError(f"special token {s!r} is already in the vocabulary")
        tj.setdefault("added_tokens", []).append({"id": next_id, "content": s, "single_word": False, "lstrip": False,
                                                 "rstrip": False, "normalized": False, "special": True})
        new_ids.append(next_id)
        report.special.append(s)
        next_id += 1
    return next_id


def _write_json_tokenizer(src_tok: Path, tj: dict, specials: bool, work: Path) -> None:
    """tokenizer.json (edited) + the source's other tokenizer files into `work`."""
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

    if init not in INITS:
        raise MtoolError(f"unknown --init {init!r} (choose from {', '.join(INITS)})")
    if (tokens_file is None) == (sp_model is None) and not specials:
        raise MtoolError("give exactly one of --tokens or --sp-model (or only --special tokens)")
    if tokens_file is not None and sp_model is not None:
        raise MtoolError("give --tokens or --sp-model, not both")
    if pad_to_multiple_of < 0:
        raise MtoolError("--pad-to-multiple-of must be positive")
    src, out = Path(src), Path(out)
    inputs = [src, tokens_file, sp_model]
    check_output_path(out, force=force, sources=inputs)
    model = load_canonical(src)
    report = ExtendReport(old_vocab=model.vocab_size)
    tokens = read_tokens(tokens_file, report) if tokens_file is not None else []
    with tempfile.TemporaryDirectory(prefix="mtool-vocab-") as tmp:
        work = Path(tmp) / "tok"
        if (model.tokenizer_dir / "tokenizer.model").is_file():
            plan = _plan_spm(model.tokenizer_dir, tokens, sp_model, list(specials), report, work)
        elif (model.tokenizer_dir / "tokenizer.json").is_file():
            if sp_model is not None:
                raise UsageError("--sp-model needs a SentencePiece source tokenizer (tokenizer.model)")
            tj = read_json(model.tokenizer_dir / "tokenizer.json")
            if is_sentencepiece_json(tj):
                plan = _plan_spm_json(model.tokenizer_dir, tj, tokens, list(specials), model.vocab_size, report, work)
            else:
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
                                         sources=tuple(p for p in inputs if p is not None), progress=progress)
    return report
