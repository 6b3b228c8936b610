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
    # K- and I-quant mixtures: llama.cpp's perplexity README (Llama-3-8B KL-divergence table: q6_K ~0.005,
    # q5_K_M ~0.01, q4_K_M ~0.03, iq4_xs ~0.03, q3_K_M ~0.09, q2_K ~0.37 mean KLD) with about 3-4x headroom
    "q6_k": Thresholds(max_kld=2e-2, min_top1=0.93, max_ppl_ratio=1.02),
    "q5_k_m": Thresholds(max_kld=5e-2, min_top1=0.90, max_ppl_ratio=1.05),
    "q5_k_s": Thresholds(max_kld=5e-2, min_top1=0.90, max_ppl_ratio=1.05),
    "q4_k_m": Thresholds(max_kld=1e-1, min_top1=0.85, max_ppl_ratio=1.10),
    "q4_k_s": Thresholds(max_kld=1.2e-1, min_top1=0.85, max_ppl_ratio=1.12),
    "iq4_xs": Thresholds(max_kld=1e-1, min_top1=0.85, max_ppl_ratio=1.10),
    "iq4_nl": Thresholds(max_kld=1e-1, min_top1=0.85, max_ppl_ratio=1.10),
    "q3_k_l": Thresholds(max_kld=2.5e-1, min_top1=0.78, max_ppl_ratio=1.20),
    "q3_k_m": Thresholds(max_kld=3e-1, min_top1=0.75, max_ppl_ratio=1.25),
    "iq3_m": Thresholds(max_kld=3e-1, min_top1=0.75, max_ppl_ratio=1.25),
    "iq3_s": Thresholds(max_kld=3e-1, min_top1=0.75, max_ppl_ratio=1.25),
    "q3_k_s": Thresholds(max_kld=5e-1, min_top1=0.70, max_ppl_ratio=1.40),
    "q2_k": Thresholds(max_kld=1.2, min_top1=0.55, max_ppl_ratio=2.00),
    # the low-bit I-quants (always with an importance matrix); same table: iq3_xxs ~0.16, iq2_m ~0.3,
    # iq2_s ~0.37, iq2_xs ~0.45, iq2_xxs ~0.6, iq1_m ~1.2, iq1_s ~1.8 mean KLD, with 2-3x headroom
    "iq3_xxs": Thresholds(max_kld=5e-1, min_top1=0.70, max_ppl_ratio=1.40),
    "iq2_m": Thresholds(max_kld=1.0, min_top1=0.55, max_ppl_ratio=2.00),
    "iq2_s": Thresholds(max_kld=1.2, min_top1=0.52, max_ppl_ratio=2.20),
    "iq2_xs": Thresholds(max_kld=1.4, min_top1=0.50, max_ppl_ratio=2.50),
    "iq2_xxs": Thresholds(max_kld=1.8, min_top1=0.45, max_ppl_ratio=3.00),
    "iq1_m": Thresholds(max_kld=3.0, min_top1=0.35, max_ppl_ratio=5.00),
    "iq1_s": Thresholds(max_kld=4.0, min_top1=0.30, max_ppl_ratio=8.00),
    # calibrated HF-format checkpoints, by bits (GPTQ paper: 4-bit LLaMA-7B PPL +7 %; 3/2 bits far more)
    "gptq-8bit": Thresholds(max_kld=1e-2, min_top1=0.95, max_ppl_ratio=1.02),
    "gptq-4bit": Thresholds(max_kld=1e-1, min_top1=0.85, max_ppl_ratio=1.10),
    "awq-4bit": Thresholds(max_kld=1e-1, min_top1=0.85, max_ppl_ratio=1.10),
    "gptq-3bit": Thresholds(max_kld=3e-1, min_top1=0.70, max_ppl_ratio=1.30),
    "gptq-2bit": Thresholds(max_kld=1.0, min_top1=0.50, max_ppl_ratio=2.50),
}

# llama.cpp file-type ids (general.file_type) -> our type names
FILE_TYPE_NAMES = {0: "f32", 1: "f16", 32: "bf16", 7: "q8_0", 8: "q5_0", 9: "q5_1", 2: "q4_0", 3: "q4_1",
                   10: "q2_k", 11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s",
                   17: "q5_k_m", 18: "q6_k", 25: "iq4_nl", 26: "iq3_s", 27: "iq3_m", 30: "iq4_xs",
                   19: "iq2_xxs", 20: "iq2_xs", 23: "iq3_xxs", 24: "iq1_s", 28: "iq2_s", 29: "iq2_m", 31: "iq1_m"}


def defaults_for(kind: str) -> Thresholds:
    """Thresholds for an artifact type; unknown types get the loosest (4-bit) set."""
    return DEFAULTS.get(kind, DEFAULTS["q4_0"])
