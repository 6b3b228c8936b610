"""`mtool verify`: compare a reference model and a candidate artifact on the same token windows."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..convert.hf_export import export_hf
from ..device import resolve_device
from ..errors import InputError, VerifySetupError
from ..gguf_file import is_gguf
from ..model.checkpoint import read_json
from ..model.canonical import CanonicalModel
from ..model.families import NATIVE, load_canonical
from ..data import load_text
from .data import enough_text, token_windows
from .metrics import ParityAccumulator, json_safe
from .reftok import ReferenceTokenizer, compare_tokenization
from .runners import HFRunner, open_candidate
from .streamed import StreamedRunner, streams
from .thresholds import FILE_TYPE_NAMES, Thresholds, defaults_for

# Fewer scored positions than this cannot support a verdict (KLD and top-1 of a handful of
# tokens say nothing about a model).
MIN_SCORED_POSITIONS = 64

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
        """The report as JSON-safe data (NaN/Inf metrics become null)."""
        return json_safe({
            "ref": self.ref, "cand": self.cand, "ref_runner": self.ref_runner, "cand_runner": self.cand_runner,
            "artifact_type": self.artifact_type, "metrics": self.metrics, "tokenization": self.tokenization,
            "thresholds": self.thresholds, "passed": self.passed, "failures": self.failures,
        })

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
        rows += [("note", n, "") for n in self.tokenization.get("notes", [])]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
        verdict = "PASS" if self.passed else "FAIL: " + "; ".join(self.failures)
        return "\n".join(lines + [verdict])


def _artifact_type(cand: Path, cand_runner) -> str:
    if is_gguf(cand):
        ft = cand_runner.metadata.get("general.file_type")
        return FILE_TYPE_NAMES.get(ft, f"gguf-ftype-{ft}")
    cfg = read_json(cand / "config.json") if (cand / "config.json").is_file() else {}
    q = cfg.get("quantization_config")
    return "f32" if not q else f"{q.get('quant_method', 'quantized')}-{q.get('bits', '?')}bit"


@contextlib.contextmanager
def canonical_reference(model: CanonicalModel) -> Iterator[Path]:
    """The reference (opened with load_canonical) as a directory transformers loads without remote code.

    Directories of a native architecture (Llama, Mistral, Mixtral, Qwen2) are used as they are;
    other families (TeleChat) are written to a temporary canonical HF checkpoint, which is removed
    afterwards (the model is loaded into memory before that)."""
    ref = model.source
    if set(read_json(ref / "config.json").get("architectures") or []) & NATIVE:
        yield ref
        return
    with tempfile.TemporaryDirectory(prefix="mtool-ref-") as tmp:
        yield export_hf(model, Path(tmp) / "canonical", progress=False)


@dataclass
class Reference:
    """The reference side of a verification, prepared once: the model (opened with its family's
    checks), its tokenizer, the text and the token windows. Running it is `iter_logits`; a release
    runs it once and compares every artifact with the cached logits."""

    path: Path
    model: CanonicalModel
    tok: ReferenceTokenizer
    text: str
    windows: list[list[int]]
    device: str = "auto"
    mode: str = "auto"  # auto | whole | streamed
    label: str = ""

    @property
    def streams(self) -> bool:
        return streams(self.model, self.mode)

    def iter_logits(self, on_layer: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
        """Logits of each window, in order (streamed: after one pass over the layers)."""
        if self.streams:
            runner = StreamedRunner(self.model, self.device)
            self.label = runner.label
            yield from runner.iter_logits(self.windows, on_layer=on_layer)
            return
        with canonical_reference(self.model) as ref_dir:
            runner = HFRunner(ref_dir, self.device)  # loaded into memory: the temporary copy may go
        self.label = runner.label
        for w in self.windows:
            yield runner.logits(w)

    @property
    def n_steps(self) -> int:
        """Progress steps of a run: the layers (when streamed) and the windows."""
        return len(self.windows) + (self.model.n_layers if self.streams else 0)


def open_reference(ref: Path, *, data: Path | None = None, device: str = "auto", ctx: int = 512,
                   max_windows: int = 8, reference: str = "auto", model: CanonicalModel | None = None) -> Reference:
    """Check the reference and the text, and cut the windows every candidate is run on
    (`model`: the reference already opened with load_canonical)."""
    ref = Path(ref)
    if ctx < 16:
        raise VerifySetupError(f"--ctx {ctx} is too small; use at least 16 tokens per window")
    if max_windows < 1:
        raise VerifySetupError(f"--max-windows must be at least 1, got {max_windows}")
    if not ref.is_dir():
        raise InputError(f"reference {ref} must be a Hugging Face model directory")
    if reference not in ("auto", "whole", "streamed"):
        raise VerifySetupError(f"--reference must be auto, whole or streamed, not {reference!r}")
    text = load_text(data)
    if model is None:
        model = load_canonical(ref)  # the family checks, with their clear errors, before any weight is read
    tok = ReferenceTokenizer.open(ref)
    n_ctx = int(model.config.get("max_position_embeddings", 2048))
    ctx = min(ctx, n_ctx)
    if ctx < 16:
        raise VerifySetupError(f"the reference's context ({n_ctx} tokens) is too short to verify with")
    text, ids = enough_text(text, tok.encode, ctx * max_windows)  # also what both tokenizers are compared on
    bos = tok.bos_id if (ids and tok.bos_id is not None and ids[0] == tok.bos_id) else None
    windows = token_windows(ids, ctx, max_windows, bos)
    scored = sum(len(w) - 1 for w in windows)
    if scored < MIN_SCORED_POSITIONS:
        raise VerifySetupError(
            f"only {scored} positions to score ({len(windows)} window(s) of up to {ctx} tokens from "
            f"{data or 'the built-in text'}); need at least {MIN_SCORED_POSITIONS}: give more --data text, "
            f"a larger --ctx or more --max-windows")
    return Reference(ref, model, tok, text, windows, device, reference)


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
    progress: bool = False,
    reference: str = "auto",
) -> VerifyReport:
    """Run both models on the same windows of `data` and judge the candidate.

    `reference`: "whole" loads the reference model in float32; "streamed" runs it one decoder
    layer at a time over all windows (StreamedRunner: memory of one layer, whatever the model);
    "auto" streams models whose float32 weights exceed STREAM_ABOVE_BYTES.

    Errors (exit 2) are raised for what prevents a verdict: unreadable inputs, too little
    text, a reference that computes NaN. A candidate that computes NaN is a FAIL."""
    if not Path(cand).exists():
        raise InputError(f"candidate {cand} does not exist")
    r = open_reference(ref, data=data, device=device, ctx=ctx, max_windows=max_windows, reference=reference)
    return compare_candidate(r, r.iter_logits, cand, thresholds=thresholds, overrides=overrides,
                             allow_token_mismatch=allow_token_mismatch, threads=threads, progress=progress)


def compare_candidate(
    r: Reference,
    ref_logits: Callable[..., Iterator[np.ndarray]],
    cand: Path,
    *,
    thresholds: Thresholds | None = None,
    overrides: dict | None = None,
    allow_token_mismatch: bool = False,
    threads: int | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Run the candidate on the reference's windows and judge it against `ref_logits(on_layer=...)`:
    the reference run itself, or its cached logits."""
    cand = Path(cand)
    if not cand.exists():
        raise InputError(f"candidate {cand} does not exist")
    ctx = max(len(w) for w in r.windows)
    cand_runner = open_candidate(cand, n_ctx=ctx, device=r.device, threads=threads, reference=r.mode)
    if cand_runner.vocab_size != r.model.vocab_size:
        raise VerifySetupError(
            f"vocab sizes differ: reference {r.model.vocab_size}, candidate {cand_runner.vocab_size}"
        )
    acc = ParityAccumulator(device=resolve_device(r.device))  # where the reference ran
    windows = r.windows
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=r.n_steps, desc="verify (layers, windows)", unit="step", leave=False)
    ref_iter = ref_logits(on_layer=lambda i: bar and bar.update(1))
    cand_iter = (cand_runner.iter_logits(windows) if isinstance(cand_runner, StreamedRunner)
                 else (cand_runner.logits(w) for w in windows))
    for i, (w, rl, cl) in enumerate(zip(windows, ref_iter, cand_iter)):
        if not np.isfinite(rl).all():
            raise VerifySetupError(f"the reference {r.path} computes NaN/Inf logits (window {i}); "
                                   f"its weights or config are broken, so nothing can be verified against it")
        acc.add(w, rl, cl)
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    metrics = acc.result()
    tokenization = compare_tokenization(r.tok, r.text, cand, cand_runner)
    kind = _artifact_type(cand, cand_runner)
    th, failures = verdict(metrics, kind, tokenization, thresholds=thresholds, overrides=overrides,
                           allow_token_mismatch=allow_token_mismatch)
    return VerifyReport(
        str(r.path), str(cand), r.label, cand_runner.label, kind, metrics, tokenization, th, failures
    )


def verdict(metrics: dict, kind: str, tokenization: dict, *, thresholds: Thresholds | None = None,
            overrides: dict | None = None, allow_token_mismatch: bool = False) -> tuple[dict, list[str]]:
    """The thresholds that apply to an artifact of type `kind` (its defaults, or `thresholds`, with
    `overrides`) and the failure reasons of `metrics` and `tokenization` against them."""
    th = (thresholds or defaults_for(kind)).as_dict()
    th.update({k: v for k, v in (overrides or {}).items() if v is not None})
    failures = judge(metrics, th)
    if tokenization.get("checked") and not tokenization["match"] and not allow_token_mismatch:
        failures.append("tokenization differs from the reference tokenizer")
    return th, failures


def judge(metrics: dict, th: dict) -> list[str]:
    """Failure reasons of `metrics` against thresholds `th`; non-finite values always fail
    (a NaN compares false with every threshold, so it is checked first)."""
    if metrics.get("nonfinite_positions"):
        return [f"candidate computes NaN/Inf logits at {metrics['nonfinite_positions']} of "
                f"{metrics['positions']} positions"]
    failures = []
    for key in ("kld_mean", "top1_agreement", "ppl_ratio"):
        if not np.isfinite(metrics[key]):
            failures.append(f"{key} is not finite")
    if failures:
        return failures
    if metrics["kld_mean"] > th["max_kld"]:
        failures.append(f"mean KLD {metrics['kld_mean']:.3e} > {th['max_kld']:.0e}")
    if metrics["top1_agreement"] < th["min_top1"]:
        failures.append(f"top-1 agreement {metrics['top1_agreement']:.4f} < {th['min_top1']}")
    if metrics["ppl_ratio"] > th["max_ppl_ratio"]:
        failures.append(f"PPL ratio {metrics['ppl_ratio']:.5f} > {th['max_ppl_ratio']}")
    return failures
