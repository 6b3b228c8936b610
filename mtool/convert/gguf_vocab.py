"""Tokenizer -> GGUF vocabulary (tokens, scores, types, merges, special ids, chat template).

SentencePiece models (`tokenizer.model`) are read with sentencepiece itself; byte-level
BPE models from `tokenizer.json`. The GGUF vocab always has exactly `vocab_size` entries
(the embedding rows): rows the tokenizer does not name become unused `[PAD{i}]` tokens
(the Ziya2 case), never dropped. Special ids, add_bos/add_eos and the chat template come
from `gguf.SpecialVocab`, the same reader llama.cpp's converter uses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..errors import MtoolError
from ..model.checkpoint import read_json

TT = gguf.TokenType
ADDED_TOKEN_SCORE = -1000.0
PAD_SCORE = -10000.0


@dataclass
class GGUFVocab:
    """Everything the GGUF tokenizer section needs."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str | None
    tokens: list[bytes]
    scores: list[float] | None  # None for byte-level BPE (merge ranks decide; llama.cpp's converter writes none)
    types: list[int]
    special: gguf.SpecialVocab
    add_space_prefix: bool | None = None
    notes: list[str] = field(default_factory=list)

    def nbytes_estimate(self) -> int:
        """Bytes the tokenizer section takes in the GGUF (for the free-space check)."""
        merges = sum(len(m) + 8 for m in (self.special.merges or []))
        template = len((self.special.chat_template or "").encode()) if isinstance(self.special.chat_template, str) else 0
        return sum(len(t) + 8 for t in self.tokens) + 8 * len(self.tokens) + merges + template + 4096

    def add_to(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        if self.pre:
            w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        w.add_token_types(self.types)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(w, quiet=True)


def _added_tokens(tok_dir: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from tokenizer.json, tokenizer_config.json and added_tokens.json."""
    out: dict[int, tuple[str, bool]] = {}
    tj = tok_dir / "tokenizer.json"
    if tj.is_file():
        for t in json.loads(tj.read_text(encoding="utf-8")).get("added_tokens", []):
            out[int(t["id"])] = (t["content"], bool(t.get("special", False)))
    tc = tok_dir / "tokenizer_config.json"
    if tc.is_file():
        for tid, t in (json.loads(tc.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}).items():
            out[int(tid)] = (t["content"], bool(t.get("special", False)))
    at = tok_dir / "added_tokens.json"
    if at.is_file():
        for content, tid in json.loads(at.read_text(encoding="utf-8")).items():
            out.setdefault(int(tid), (content, False))
    return out


def _special_vocab(tok_dir: Path, n_vocab: int, *, merges: bool, default_add_bos: bool | None) -> gguf.SpecialVocab:
    sv = gguf.SpecialVocab(tok_dir, load_merges=merges, n_vocab=n_vocab)
    if "bos" not in sv.add_special_token and default_add_bos is not None:
        sv.add_special_token["bos"] = default_add_bos
    return sv


def _sentencepiece_vocab(tok_dir: Path, vocab_size: int) -> GGUFVocab:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = tok_dir / "tokenizer.model"
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise MtoolError(f"cannot read SentencePiece model {path}: {e}") from None
    n_pieces = sp.vocab_size()
    if n_pieces > vocab_size:
        raise MtoolError(
            f"{path} has {n_pieces} pieces but config vocab_size is {vocab_size}: the embedding has fewer rows than the tokenizer"
        )
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [PAD_SCORE] * vocab_size
    types = [TT.UNUSED] * vocab_size
    for i in range(n_pieces):
        tokens[i] = sp.id_to_piece(i).encode("utf-8")
        scores[i] = sp.get_score(i)
        types[i] = (
            TT.UNKNOWN if sp.is_unknown(i) else TT.CONTROL if sp.is_control(i)
            else TT.UNUSED if sp.is_unused(i) else TT.BYTE if sp.is_byte(i) else TT.NORMAL
        )
    for tid, (content, special) in sorted(_added_tokens(tok_dir).items()):
        if tid < n_pieces:
            continue  # the piece itself (e.g. <s>, </s>): SentencePiece already typed it
        if tid >= vocab_size:
            raise MtoolError(
                f"added token {content!r} has id {tid} beyond the embedding rows (vocab_size {vocab_size}); grow the model first"
            )
        tokens[tid] = content.encode("utf-8")
        scores[tid] = ADDED_TOKEN_SCORE
        types[tid] = TT.CONTROL if special else TT.USER_DEFINED
    notes = []
    n_pad = sum(1 for t in types[n_pieces:] if t == TT.UNUSED)
    if n_pad:
        notes.append(f"vocab: {n_pieces} SentencePiece pieces, {n_pad} padding rows kept as unused [PAD] tokens")
    # LlamaTokenizer adds BOS unless its config says otherwise.
    special = _special_vocab(tok_dir, vocab_size, merges=False, default_add_bos=True)
    return GGUFVocab(
        "llama", "default", tokens, scores, types, special,
        add_space_prefix=_space_prefix(tok_dir, bool(proto.normalizer_spec.add_dummy_prefix)), notes=notes,
    )


def _space_prefix(tok_dir: Path, proto_default: bool) -> bool:
    """Whether the HF tokenizer puts '▁' before the text, which llama.cpp must then do too.

    tokenizer.json is what transformers runs, so it wins over the SentencePiece proto: the
    Llama-2 style has a Prepend('▁') normalizer, newer ones a Metaspace pre-tokenizer with a
    prepend scheme, and files saved by transformers v5 from a converted model may have neither.
    """
    tj = tok_dir / "tokenizer.json"
    if not tj.is_file():
        return proto_default
    tokenizer = json.loads(tj.read_text(encoding="utf-8"))
    for n in _walk(tokenizer.get("normalizer"), "normalizers"):
        if n.get("type") == "Prepend" and n.get("prepend") == "\u2581":
            return True
    for p in _walk(tokenizer.get("pre_tokenizer"), "pretokenizers"):
        if p.get("type") == "Metaspace":
            return p.get("prepend_scheme", "always" if p.get("add_prefix_space", True) else "never") != "never"
    return False


# Pre-tokenizer regexes of tokenizer.json files -> llama.cpp's pre-tokenizer names.
_LLAMA3_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_QWEN2_REGEX = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
_PRE_BY_REGEX = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}


def _bpe_pre(tokenizer: dict) -> str:
    """Name llama.cpp's pre-tokenizer that matches tokenizer.json's pre_tokenizer."""
    pre = tokenizer.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    for p in parts:
        if p.get("type") == "Split":
            regex = (p.get("pattern") or {}).get("Regex")
            if regex in _PRE_BY_REGEX:
                return _PRE_BY_REGEX[regex]
    raise MtoolError(
        f"tokenizer.json: byte-level BPE with pre-tokenizer {kinds} has no llama.cpp equivalent mtool knows "
        f"(supported: GPT-2, Llama 3 and Qwen2 splits, and SentencePiece-style '\u2581' tokenizers)"
    )


def _bpe_vocab(tok_dir: Path, vocab_size: int) -> GGUFVocab:
    tokenizer = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE":
        raise MtoolError(f"{tok_dir}/tokenizer.json: tokenizer model {model.get('type')!r} is not supported (BPE or SentencePiece)")
    pre = _bpe_pre(tokenizer)
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    types = [TT.UNUSED] * vocab_size
    for text, tid in model["vocab"].items():
        if tid >= vocab_size:
            raise MtoolError(f"token {text!r} has id {tid} beyond the embedding rows (vocab_size {vocab_size})")
        tokens[tid] = text.encode("utf-8")
        types[tid] = TT.NORMAL
    for tid, (content, special) in _added_tokens(tok_dir).items():
        if tid >= vocab_size:
            raise MtoolError(f"added token {content!r} has id {tid} beyond the embedding rows (vocab_size {vocab_size})")
        tokens[tid] = content.encode("utf-8")
        types[tid] = TT.CONTROL if special else TT.USER_DEFINED
    special = _special_vocab(tok_dir, vocab_size, merges=True, default_add_bos=None)
    return GGUFVocab("gpt2", pre, tokens, None, types, special)


_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _walk(node: dict | None, key: str) -> list[dict]:
    """The leaves of a tokenizer.json normalizer / pre_tokenizer (Sequence nodes flattened)."""
    if not node:
        return []
    return [x for child in node.get(key, []) for x in _walk(child, key)] if node.get("type") == "Sequence" else [node]


def is_sentencepiece_json(tokenizer: dict) -> bool:
    """A tokenizer.json of the SentencePiece family (Llama-2 / Mistral / Yi shape): BPE with byte
    fallback over '▁'-escaped text, as Hub repos ship it and transformers v5 saves it, rather than
    byte-level BPE (GPT-2 / Llama 3 / Qwen2)."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        return False
    escapes = any(n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " "
                  and n.get("content") == "\u2581" for n in _walk(tokenizer.get("normalizer"), "normalizers"))
    escapes |= any(p.get("type") == "Metaspace" for p in _walk(tokenizer.get("pre_tokenizer"), "pretokenizers"))
    return escapes and (bool(model.get("byte_fallback")) or "<0x00>" in (model.get("vocab") or {}))


def merge_pairs(merges: list) -> list[tuple[str, str]]:
    """tokenizer.json merges in either spelling ("a b" strings or [a, b] pairs)."""
    out = []
    for m in merges:
        if isinstance(m, str):
            a, _, b = m.partition(" ")
        else:
            a, b = m
        out.append((a, b))
    return out


def merge_scores(merges: list[tuple[str, str]]) -> dict[str, float]:
    """SentencePiece-style scores that make llama.cpp merge in the tokenizer's own order.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation is the
    vocabulary piece of highest score (leftmost on ties); HF's BPE merges the pair of lowest
    rank. A token's score is minus the rank of the first merge that produces it, so the two
    agree. (Token ids, which llama.cpp's converter falls back to, order merges wrongly.)"""
    scores: dict[str, float] = {}
    for rank, (a, b) in enumerate(merges):
        scores.setdefault(a + b, -float(rank))
    return scores


def _sentencepiece_json_vocab(tok_dir: Path, tokenizer: dict, vocab_size: int) -> GGUFVocab:
    """GGUF "llama" vocabulary from a SentencePiece-family tokenizer.json without tokenizer.model."""
    model = tokenizer["model"]
    vocab: dict[str, int] = model.get("vocab") or {}
    scores_by_piece = merge_scores(merge_pairs(model.get("merges") or []))
    unk = model.get("unk_token")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [PAD_SCORE] * vocab_size
    types = [TT.UNUSED] * vocab_size
    unmerged = 0
    for piece, tid in vocab.items():
        if tid >= vocab_size:
            raise MtoolError(f"token {piece!r} has id {tid} beyond the embedding rows (vocab_size {vocab_size})")
        tokens[tid] = piece.encode("utf-8")
        if piece == unk:
            types[tid], scores[tid] = TT.UNKNOWN, 0.0
        elif _BYTE_PIECE.match(piece):
            types[tid], scores[tid] = TT.BYTE, 0.0
        else:
            types[tid] = TT.NORMAL
            # single characters are never merge results, so their score is never compared
            scores[tid] = scores_by_piece.get(piece, 0.0 if len(piece) == 1 else PAD_SCORE)
            unmerged += len(piece) > 1 and piece not in scores_by_piece
    for tid, (content, special) in sorted(_added_tokens(tok_dir).items()):
        if tid >= vocab_size:
            raise MtoolError(f"added token {content!r} has id {tid} beyond the embedding rows (vocab_size {vocab_size})")
        if tid in vocab.values() and content == unk:
            continue
        tokens[tid] = content.encode("utf-8")
        scores[tid] = ADDED_TOKEN_SCORE if tokens[tid] != (unk or "").encode() else 0.0
        types[tid] = TT.CONTROL if special else TT.USER_DEFINED
    notes = [f"vocab: SentencePiece-style tokenizer.json without tokenizer.model ({len(vocab)} pieces); "
             f"scores derived from its merge order"]
    if unmerged:
        notes.append(f"vocab: {unmerged} multi-character pieces are produced by no merge (kept, lowest score)")
    special = _special_vocab(tok_dir, vocab_size, merges=False, default_add_bos=_json_adds_bos(tok_dir))
    return GGUFVocab("llama", "default", tokens, scores, types, special,
                     add_space_prefix=_space_prefix(tok_dir, True), notes=notes)


def _json_adds_bos(tok_dir: Path) -> bool | None:
    """Whether tokenizer.json's post-processor puts BOS first, observed with the tokenizers library."""
    from tokenizers import Tokenizer

    try:
        tk = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception for bad files
        raise MtoolError(f"{tok_dir}/tokenizer.json cannot be loaded by the tokenizers library") from None
    ids = tk.encode("a").ids
    specials = {t.content for t in tk.get_added_tokens_decoder().values() if t.special}
    return bool(ids) and tk.id_to_token(ids[0]) in specials


def build_vocab(tok_dir: Path, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary for the tokenizer files in `tok_dir`."""
    tok_dir = Path(tok_dir)
    if (tok_dir / "tokenizer.model").is_file():
        return _sentencepiece_vocab(tok_dir, vocab_size)
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = read_json(tok_dir / "tokenizer.json")
        if is_sentencepiece_json(tokenizer):
            return _sentencepiece_json_vocab(tok_dir, tokenizer, vocab_size)
        return _bpe_vocab(tok_dir, vocab_size)
    raise MtoolError(f"{tok_dir} has no tokenizer.model or tokenizer.json; the GGUF needs a vocabulary")


def token_id(tokens: list[bytes], token: str, what: str) -> int:
    """Id of `token` in a GGUF token list, with an error naming who asked for it."""
    raw = token.encode("utf-8")
    for i, t in enumerate(tokens):
        if t == raw:
            return i
    raise MtoolError(f"{what} names token {token!r}, which the tokenizer does not have")


def apply_recipe(vocab: GGUFVocab, recipe) -> None:
    """Recipe overrides: chat template and the token that ends generation."""
    if recipe is None:
        return
    if recipe.chat_template:
        vocab.special.chat_template = recipe.chat_template
    if recipe.eos_token:
        vocab.special.special_token_ids["eos"] = token_id(vocab.tokens, recipe.eos_token, f"recipe {recipe.name}")
