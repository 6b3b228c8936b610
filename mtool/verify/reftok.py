"""The tokenizer a model was built with, as the reference for tokenization parity.

Where `tokenizer.model` exists that is SentencePiece itself: transformers v5's tokenizers-
based LlamaTokenizer differs from it in known places (it drops the dummy prefix before text
that starts with a space), and llama.cpp follows SentencePiece. Such a disagreement of
transformers is reported as a note, never as a failure of a correct artifact. Without
`tokenizer.model`, tokenizer.json (through transformers) is the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..model.tokenizer import open_tokenizer


@dataclass
class ReferenceTokenizer:
    encode: Callable[[str], list[int]]
    bos_id: int | None
    label: str
    hf_encode: Callable[[str], list[int]]  # transformers' view, for the notes
    notes: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, tok_dir: Path) -> ReferenceTokenizer:
        tok_dir = Path(tok_dir)
        try:
            hf = open_tokenizer(tok_dir)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for bad tokenizer files
            raise InputError(f"cannot load the tokenizer of {tok_dir}: {str(e).splitlines()[0][:200]}") from None

        def hf_encode(text: str) -> list[int]:
            return list(hf(text)["input_ids"])

        probe = hf_encode("a")
        bos = hf.bos_token_id if (hf.bos_token_id is not None and probe[:1] == [hf.bos_token_id]) else None
        sp_path = tok_dir / "tokenizer.model"
        if sp_path.is_file():
            import sentencepiece as spm

            try:
                sp = spm.SentencePieceProcessor(model_file=str(sp_path))
            except Exception:  # noqa: BLE001
                raise InputError(f"{sp_path} is not a valid SentencePiece model") from None
            prefix = [bos] if bos is not None else []
            return cls(lambda text: prefix + sp.encode(text), bos, "SentencePiece", hf_encode)
        return cls(hf_encode, bos, "transformers", hf_encode)


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare_tokenization(ref: ReferenceTokenizer, text: str, cand: Path, cand_runner) -> dict:
    """Tokenize `text` with the reference and the candidate; a dict for the report.

    GGUF candidates are tokenized by llama.cpp; HF directories by their own tokenizer files
    (opened the same way as the reference's, so the files themselves are compared)."""
    ref_ids = ref.encode(text)
    notes = []
    if ref.label == "SentencePiece":
        hf_ids = ref.hf_encode(text)
        if hf_ids != ref_ids:
            i = _first_diff(hf_ids, ref_ids)
            notes.append(f"transformers' tokenizer differs from SentencePiece at token {i} "
                         f"(a known transformers v5 behaviour); SentencePiece is the reference")
    if hasattr(cand_runner, "tokenize"):
        cand_ids, who = cand_runner.tokenize(text), "llama.cpp"
    else:
        cand_ids, who = ReferenceTokenizer.open(Path(cand)).encode(text), "candidate tokenizer"
    if cand_ids != ref_ids and ref.label == "transformers" and text.startswith(" "):
        # tokenizer.json with a Metaspace "first" / Prepend normalizer: transformers skips the
        # dummy prefix when the text already starts with a space, SentencePiece (and llama.cpp)
        # do not. Prepending one space reproduces SentencePiece exactly.
        alt = ref.encode(" " + text)
        if cand_ids == alt:
            notes.append("the candidate keeps SentencePiece's dummy prefix before leading spaces, which "
                         "transformers drops; equal otherwise")
            ref_ids = alt
    base = {"checked": True, "reference": ref.label, "candidate": who, "notes": notes}
    if cand_ids == ref_ids:
        return {**base, "match": True, "summary": f"identical ({len(ref_ids)} tokens, {who} vs {ref.label})",
                "tokens": len(ref_ids)}
    first = _first_diff(ref_ids, cand_ids)
    return {
        **base, "match": False, "first_mismatch": first, "ref_tokens": len(ref_ids), "cand_tokens": len(cand_ids),
        "summary": f"DIFFERS at token {first} ({ref.label} {ref_ids[first:first + 4]} vs {who} "
                   f"{cand_ids[first:first + 4]})",
    }
