"""`mtool verify`: compare a reference model and a candidate artifact on the same token windows."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MtoolError
from .data import load_text, token_windows
from .metrics import ParityAccumulator
from .runners import HFRunner, gguf_metadata, is_gguf, open_candidate
from .thresholds import FILE_TYPE_NAMES, Thresholds, defaults_for


@dataclass
class VerifyReport:
    ref: str
    cand: str
    ref_runner: str
    cand_runner: str
    artifact_type: str
    metrics: dict
    tokenization: dict
    thresholds: dict
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {
            "ref": self.ref, "cand": self.cand, "ref_runner": self.ref_runner, "cand_runner": self.cand_runner,
            "artifact_type": self.artifact_type, "metrics": self.metrics, "tokenization": self.tokenization,
            "thresholds": self.thresholds, "passed": self.passed, "failures": self.failures,
        }

    def table(self) -> str:
        m, t = self.metrics, self.thresholds
        rows = [
            ("reference", f"{self.ref}  [{self.ref_runner}]", ""),
            ("candidate", f"{self.cand}  [{self.cand_runner}]", ""),
            ("artifact type", self.artifact_type, ""),
            ("positions", str(m["positions"]), ""),
            ("perplexity ref / cand", f"{m['ppl_ref']:.4f} / {m['ppl_cand']:.4f}", ""),
            ("PPL ratio", f"{m['ppl_ratio']:.5f}", f"<= {t['max_ppl_ratio']}"),
            ("mean KLD", f"{m['kld_mean']:.3e}", f"<= {t['max_kld']:.0e}"),
            ("p99 KLD", f"{m['kld_p99']:.3e}", ""),
            ("top-1 agreement", f"{100 * m['top1_agreement']:.2f} %", f">= {100 * t['min_top1']:.1f} %"),
            ("max |dlogit|", f"{m['max_abs_dlogit']:.3e}", ""),
            ("max rel. error", f"{m['max_rel_err']:.3e}", ""),
            ("tokenization", self.tokenization["summary"], "must match" if self.tokenization.get("checked") else ""),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return "\n".join(lines + [verdict])


def _artifact_type(cand: Path) -> str:
    if is_gguf(cand):
        ft = gguf_metadata(cand).get("general.file_type")
        return FILE_TYPE_NAMES.get(ft, f"gguf-ftype-{ft}")
    cfg = json.loads((cand / "config.json").read_text()) if (cand / "config.json").is_file() else {}
    q = cfg.get("quantization_config")
    return "f32" if not q else f"{q.get('quant_method', 'quantized')}-{q.get('bits', '?')}bit"


def _tokenization_check(tok, text: str, cand_runner) -> dict:
    ref_ids = tok(text)["input_ids"]
    if not hasattr(cand_runner, "tokenize"):
        return {"checked": False, "summary": "same tokenizer (HF candidate)"}
    cand_ids = cand_runner.tokenize(text)
    if cand_ids == ref_ids:
        return {"checked": True, "match": True, "summary": f"identical ({len(ref_ids)} tokens)", "tokens": len(ref_ids)}
    first = next((i for i, (a, b) in enumerate(zip(ref_ids, cand_ids)) if a != b), min(len(ref_ids), len(cand_ids)))
    return {
        "checked": True, "match": False, "first_mismatch": first, "ref_tokens": len(ref_ids), "cand_tokens": len(cand_ids),
        "summary": f"DIFFERS at token {first} (HF {ref_ids[first:first + 4]} vs candidate {cand_ids[first:first + 4]})",
    }


@contextlib.contextmanager
def canonical_reference(ref: Path) -> Iterator[Path]:
    """The reference as a directory transformers loads without remote code.

    Llama/Mistral/Mixtral directories are used as they are; other families (TeleChat) are
    written to a temporary canonical HF checkpoint, which is removed afterwards (the model
    is loaded into memory before that)."""
    from ..convert.families import NATIVE, load_canonical

    archs = set(json.loads((ref / "config.json").read_text()).get("architectures") or []) if (ref / "config.json").is_file() else set()
    if archs & NATIVE or not archs:
        yield ref
        return
    from ..convert.hf_export import export_hf

    model = load_canonical(ref)
    with tempfile.TemporaryDirectory(prefix="mtool-ref-") as tmp:
        yield export_hf(model, Path(tmp) / "canonical", progress=False)


def run_verify(
    ref: Path,
    cand: Path,
    *,
    data: Path | None = None,
    device: str = "auto",
    ctx: int = 512,
    max_windows: int = 8,
    thresholds: Thresholds | None = None,
    overrides: dict | None = None,
    allow_token_mismatch: bool = False,
    threads: int | None = None,
) -> VerifyReport:
    """Run both models on the same windows of `data` and judge the candidate."""
    from transformers import AutoTokenizer

    ref, cand = Path(ref), Path(cand)
    if not ref.is_dir():
        raise MtoolError(f"reference {ref} must be a Hugging Face model directory")
    if not cand.exists():
        raise MtoolError(f"candidate {cand} does not exist")
    text = load_text(data)
    with canonical_reference(ref) as ref_dir:
        ref_runner = HFRunner(ref_dir, device)
        tok = AutoTokenizer.from_pretrained(str(ref_dir))
    ctx = min(ctx, ref_runner.n_ctx)
    ids = tok(text)["input_ids"]
    bos = tok.bos_token_id if (ids and tok.bos_token_id is not None and ids[0] == tok.bos_token_id) else None
    windows = token_windows(ids, ctx, max_windows, bos)
    cand_runner = open_candidate(cand, n_ctx=ctx, device=device, threads=threads)
    if cand_runner.vocab_size != ref_runner.vocab_size:
        raise MtoolError(
            f"vocab sizes differ: reference {ref_runner.vocab_size}, candidate {cand_runner.vocab_size}"
        )
    acc = ParityAccumulator()
    for w in windows:
        acc.add(w, ref_runner.logits(w), cand_runner.logits(w))
    metrics = acc.result()
    tokenization = _tokenization_check(tok, text, cand_runner)
    kind = _artifact_type(cand)
    th = (thresholds or defaults_for(kind)).as_dict()
    th.update({k: v for k, v in (overrides or {}).items() if v is not None})
    failures = []
    if metrics["kld_mean"] > th["max_kld"]:
        failures.append(f"mean KLD {metrics['kld_mean']:.3e} > {th['max_kld']:.0e}")
    if metrics["top1_agreement"] < th["min_top1"]:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < {th['min_top1']}")
    if metrics["ppl_ratio"] > th["max_ppl_ratio"]:
        failures.append(f"PPL ratio {metrics['ppl_ratio']:.5f} > {th['max_ppl_ratio']}")
    if tokenization.get("checked") and not tokenization["match"] and not allow_token_mismatch:
        failures.append("tokenization differs from the HF tokenizer")
    return VerifyReport(
        str(ref), str(cand), ref_runner.label, cand_runner.label, kind, metrics, tokenization, th, failures
    )
