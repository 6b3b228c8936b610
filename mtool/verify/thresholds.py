"""Default pass/fail thresholds per artifact type.

Anchored on llama.cpp's published KL-divergence reports for real models (q8_0: mean KLD
~0.0014, top-1 ~98 %; f16 conversion ~1e-5) with headroom, so that a correct conversion of
a real model passes and a broken one (wrong permutation, dropped tensor, wrong vocab) fails
by orders of magnitude.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Thresholds:
    max_kld: float
    min_top1: float
    max_ppl_ratio: float

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULTS: dict[str, Thresholds] = {
    "f32": Thresholds(max_kld=1e-4, min_top1=0.99, max_ppl_ratio=1.002),
    "f16": Thresholds(max_kld=1e-3, min_top1=0.98, max_ppl_ratio=1.005),
    "bf16": Thresholds(max_kld=1e-3, min_top1=0.98, max_ppl_ratio=1.005),
    "q8_0": Thresholds(max_kld=1e-2, min_top1=0.95, max_ppl_ratio=1.02),
    "q5_0": Thresholds(max_kld=5e-2, min_top1=0.90, max_ppl_ratio=1.05),
    "q5_1": Thresholds(max_kld=5e-2, min_top1=0.90, max_ppl_ratio=1.05),
    "q4_0": Thresholds(max_kld=1e-1, min_top1=0.85, max_ppl_ratio=1.10),
    "q4_1": Thresholds(max_kld=1e-1, min_top1=0.85, max_ppl_ratio=1.10),
    # calibrated HF-format checkpoints, by bits (GPTQ paper: 4-bit LLaMA-7B PPL +7 %; 3/2 bits far more)
    "gptq-8bit": Thresholds(max_kld=1e-2, min_top1=0.95, max_ppl_ratio=1.02),
    "gptq-4bit": Thresholds(max_kld=1e-1, min_top1=0.85, max_ppl_ratio=1.10),
    "awq-4bit": Thresholds(max_kld=1e-1, min_top1=0.85, max_ppl_ratio=1.10),
    "gptq-3bit": Thresholds(max_kld=3e-1, min_top1=0.70, max_ppl_ratio=1.30),
    "gptq-2bit": Thresholds(max_kld=1.0, min_top1=0.50, max_ppl_ratio=2.50),
}

# llama.cpp file-type ids (general.file_type) -> our type names
FILE_TYPE_NAMES = {0: "f32", 1: "f16", 32: "bf16", 7: "q8_0", 8: "q5_0", 9: "q5_1", 2: "q4_0", 3: "q4_1"}


def defaults_for(kind: str) -> Thresholds:
    """Thresholds for an artifact type; unknown types get the loosest (4-bit) set."""
    return DEFAULTS.get(kind, DEFAULTS["q4_0"])
