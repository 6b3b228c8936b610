"""GPTQ v1 and AWQ GEMM layouts: exact round trips and hand-computed words."""

from __future__ import annotations

import itertools

import pytest
import torch

from mtool.quantize.packing import (
    dequantize_awq,
    dequantize_gptq,
    pack_awq,
    pack_bitstream,
    pack_gptq,
    unpack_awq_words,
    unpack_bitstream,
    unpack_gptq,
)


def _i32(u: int) -> int:
    return u - 2**32 if u >= 2**31 else u


def test_gptq_4bit_word_by_hand():
    # input channels 0..7 of output column 0 hold codes 1..8: nibble i = code of input i
    codes = torch.zeros(8, 8, dtype=torch.int64)
    codes[:, 0] = torch.arange(1, 9)
    words = pack_bitstream(codes, 4)
    assert words.shape == (1, 8)
    assert int(words[0, 0]) == _i32(0x87654321)
    assert int(words[0, 1]) == 0


def test_gptq_3bit_straddles_words_by_hand():
    # 32 codes of 3 bits -> 3 words; code 10 spans bits 30-32 (word 0 bits 30-31, word 1 bit 0)
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[10, 0] = 0b101
    codes[21, 0] = 0b011  # bits 63-65: word 1 bit 31, word 2 bits 0-1
    w = pack_bitstream(codes, 3)
    assert w.shape == (3, 1)
    assert int(w[0, 0]) == _i32(0b01 << 30)
    assert int(w[1, 0]) == _i32((0b1 << 0) | (0b1 << 31))
    assert int(w[2, 0]) == 0b01


def test_gptq_sym_zero_stored_minus_one():
    codes = torch.zeros(8, 8, dtype=torch.int64)
    zeros = torch.full((1, 8), 8)  # symmetric 4-bit zero point
    p = pack_gptq(codes, zeros, torch.ones(1, 8), torch.zeros(8, dtype=torch.int32), 4)
    assert int(p["qzeros"][0, 0]) == 0x77777777  # 7 in every nibble


def test_awq_word_by_hand():
    codes = torch.arange(8, dtype=torch.int64).view(1, 8)  # column c holds code c
    p = pack_awq(codes, torch.zeros(1, 8, dtype=torch.int64), torch.ones(1, 8))
    assert int(p["qweight"][0, 0]) == _i32(0x75316420)  # nibbles hold columns 0,2,4,6,1,3,5,7


@pytest.mark.parametrize("bits,group,sym,desc_act", list(itertools.product((2, 3, 4, 8), (-1, 32, 64, 128), (True, False), (False, True))))
def test_gptq_round_trip(bits, group, sym, desc_act):
    g = torch.Generator().manual_seed(bits * 1000 + group)
    n_in, n_out = 256, 96
    maxq = 2**bits - 1
    n_groups = 1 if group == -1 else n_in // group
    codes = torch.randint(0, maxq + 1, (n_in, n_out), generator=g)
    zeros = torch.full((n_groups, n_out), (maxq + 1) // 2) if sym else torch.randint(1, maxq + 1, (n_groups, n_out), generator=g)
    scales = torch.rand(n_groups, n_out, generator=g).half() + 0.01
    g_idx = torch.zeros(n_in, dtype=torch.int64) if group == -1 else torch.arange(n_in) // group
    if desc_act:
        g_idx = g_idx[torch.randperm(n_in, generator=g)]
    p = pack_gptq(codes, zeros, scales, g_idx, bits)
    assert p["qweight"].shape == (n_in * bits // 32, n_out) and p["qweight"].dtype == torch.int32
    assert p["qzeros"].shape == (n_groups, n_out * bits // 32)
    c2, z2, s2, g2 = unpack_gptq(p, bits)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.equal(s2, scales) and torch.equal(g2, g_idx)
    w = dequantize_gptq(p, bits)
    expect = (scales.float()[g_idx] * (codes - zeros[g_idx]).float()).t()
    assert torch.equal(w, expect)


@pytest.mark.parametrize("group", (32, 64, 128))
def test_awq_round_trip(group):
    g = torch.Generator().manual_seed(group)
    n_in, n_out = 256, 64
    codes = torch.randint(0, 16, (n_in, n_out), generator=g)
    zeros = torch.randint(0, 16, (n_in // group, n_out), generator=g)
    scales = torch.rand(n_in // group, n_out, generator=g).half()
    p = pack_awq(codes, zeros, scales)
    assert p["qweight"].shape == (n_in, n_out // 8)
    assert torch.equal(unpack_awq_words(p["qweight"]), codes) and torch.equal(unpack_awq_words(p["qzeros"]), zeros)
    gi = torch.arange(n_in) // group
    assert torch.equal(dequantize_awq(p, group), (scales.float()[gi] * (codes - zeros[gi]).float()).t())


def test_unpack_ignores_padding_bits():
    codes = torch.randint(0, 8, (64, 3))
    assert torch.equal(unpack_bitstream(pack_bitstream(codes, 3), 3, 64), codes)


def test_gptq_handles_dead_columns_and_singular_hessians():
    from mtool.quantize.gptq import Hessian, gptq

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(16, 64, generator=g)  # 16 samples for 64 columns: H has rank 16, singular
    x[:, 5] = 0  # a dead input channel: diag(H) = 0
    h = Hessian(64)
    h.add(x)
    r, stats = gptq(w, h, 4, 32, sym=True, damp=1e-12)
    assert stats["dead"] == 1 and stats["damp"] > 1e-12  # the retry raised the damping
    assert torch.isfinite(r.dequant).all()
    assert torch.count_nonzero(r.dequant[:, 5]) == 0  # the dead column is zeroed
    assert float(((x @ (w - r.dequant).t()) ** 2).mean()) < 0.05 * float((x @ w.t()).pow(2).mean())
