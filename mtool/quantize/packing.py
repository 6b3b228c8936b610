"""GPTQ (v1) and AWQ (GEMM) checkpoint layouts: packing integer codes into int32 words and back.

Hand-written because these layouts are what loaders (vLLM, TGI, transformers via GPTQModel)
read, and the libraries that wrote them (AutoGPTQ, AutoAWQ) are archived. The layouts:

GPTQ v1, per linear with weight [out, in]:
  qweight int32 [in * bits / 32, out]  codes packed along the *input* dim as a little-endian
                                       bit stream (3-bit codes straddle words, as AutoGPTQ packs)
  qzeros  int32 [groups, out * bits / 32]  zero points minus one (v1), packed along the output
  scales  fp16  [groups, out]
  g_idx   int32 [in]                       group of each input channel
  W[o, i] = scales[g, o] * (code[i, o] - (stored_zero[g, o] + 1)),  g = g_idx[i]

AWQ GEMM (4-bit), per linear:
  qweight int32 [in, out / 8]   codes packed along the *output* dim, nibble k holding column
                                8c + ORDER[k] with ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
  qzeros  int32 [groups, out / 8]  same packing, zeros stored as they are
  scales  fp16  [groups, out]
  W[o, i] = scales[i // group, o] * (code[i, o] - zero[i // group, o])
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE = tuple(AWQ_ORDER.index(i) for i in range(8))
GPTQ_BITS = (2, 3, 4, 8)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> the int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_bitstream(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [n, m] (values < 2**bits) along dim 0 into int32 words [n * bits / 32, m]."""
    n, m = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} rows of {bits}-bit codes do not fill whole 32-bit words")
    c = codes.to(torch.int64)
    if 32 % bits == 0:
        per = 32 // bits
        c = c.reshape(n // per, per, m)
        shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
        return _to_int32((c << shifts).sum(dim=1))
    # general case (3 bits): value i occupies stream bits [i*bits, (i+1)*bits)
    bit = (c.unsqueeze(1) >> torch.arange(bits, dtype=torch.int64).view(1, bits, 1)) & 1  # [n, bits, m]
    stream = bit.reshape(n * bits // 32, 32, m)
    return _to_int32((stream << torch.arange(32, dtype=torch.int64).view(1, 32, 1)).sum(dim=1))


def unpack_bitstream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bitstream: int32 words [n * bits / 32, m] -> codes [n, m] (int64)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    k, m = w.shape
    stream = (w.unsqueeze(1) >> torch.arange(32, dtype=torch.int64).view(1, 32, 1)) & 1  # [k, 32, m]
    bit = stream.reshape(k * 32 // bits, bits, m)[:n]
    return (bit << torch.arange(bits, dtype=torch.int64).view(1, bits, 1)).sum(dim=1)


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int) -> dict:
    """codes [in, out], zeros [groups, out] (true zero points, >= 1), scales [groups, out], g_idx [in]."""
    if bits not in GPTQ_BITS:
        raise ValueError(f"GPTQ packs {GPTQ_BITS} bits, not {bits}")
    stored = zeros.to(torch.int64) - 1  # v1 stores zero - 1
    if (stored < 0).any():
        raise ValueError("GPTQ v1 cannot store a zero point of 0")
    return {
        "qweight": pack_bitstream(codes, bits),
        "qzeros": pack_bitstream(stored.t().contiguous(), bits).t().contiguous(),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(t: dict, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [in, out], zeros [groups, out], scales [groups, out], g_idx [in]) from a packed linear."""
    n_in = t["g_idx"].shape[0]
    out = t["scales"].shape[1]
    codes = unpack_bitstream(t["qweight"], bits, n_in)
    zeros = unpack_bitstream(t["qzeros"].t().contiguous(), bits, out).t() + 1
    return codes, zeros, t["scales"], t["g_idx"].to(torch.int64)


def dequantize_gptq(t: dict, bits: int) -> torch.Tensor:
    """Weight [out, in] in float32, following the published v1 formula."""
    codes, zeros, scales, g_idx = unpack_gptq(t, bits)
    s = scales.float()[g_idx]  # [in, out]
    z = zeros[g_idx]
    return (s * (codes - z).float()).t().contiguous()


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> dict:
    """codes [in, out], zeros [groups, out], scales [groups, out]; 4-bit."""

    def pack(v: torch.Tensor) -> torch.Tensor:
        n, m = v.shape
        if m % 8:
            raise ValueError(f"AWQ packs 8 output columns per word; {m} columns")
        v = v.to(torch.int64).reshape(n, m // 8, 8)[:, :, list(AWQ_ORDER)]
        shifts = (torch.arange(8, dtype=torch.int64) * 4).view(1, 1, 8)
        return _to_int32((v << shifts).sum(dim=2))

    return {"qweight": pack(codes), "qzeros": pack(zeros), "scales": scales.to(torch.float16).contiguous()}


def unpack_awq_words(words: torch.Tensor) -> torch.Tensor:
    w = words.to(torch.int64) & 0xFFFFFFFF
    n, m8 = w.shape
    nib = (w.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * 4).view(1, 1, 8)) & 0xF  # nibble k
    return nib[:, :, list(AWQ_REVERSE)].reshape(n, m8 * 8)


def dequantize_awq(t: dict, group_size: int) -> torch.Tensor:
    """Weight [out, in] in float32, following the AWQ GEMM layout."""
    codes = unpack_awq_words(t["qweight"])
    zeros = unpack_awq_words(t["qzeros"])
    g = torch.arange(codes.shape[0]) // group_size
    return (t["scales"].float()[g] * (codes - zeros[g]).float()).t().contiguous()
