"""Split GGUFs, source formats (sharded safetensors, legacy .bin, bf16) and the HF writer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtool.model.checkpoint import CheckpointReader, parse_size, write_hf_checkpoint
from mtool.model.families import load_canonical
from mtool.convert.gguf_export import export_gguf
from mtool.tiny import TinySpec, make_tiny_llama
from mtool.data import builtin_text

from .helpers import hf_ids, hf_logits, llamacpp_logits, mean_kld


def test_split_gguf_loads_and_matches_unsplit(gqa_model, tmp_path):
    model = load_canonical(gqa_model)
    whole = tmp_path / "whole.gguf"
    export_gguf(model, whole, outtype="f32", progress=False)
    res = export_gguf(model, tmp_path / "split.gguf", outtype="f32", split_max_size=200_000, progress=False)
    names = [f.name for f in res.files]
    assert len(names) >= 3
    assert names[0] == f"split-00001-of-{len(names):05d}.gguf"
    assert not (tmp_path / "split.gguf").exists()
    ids = hf_ids(gqa_model, builtin_text(), 128)
    a = llamacpp_logits(whole, ids)
    b = llamacpp_logits(res.files[0], ids)  # llama.cpp finds the other shards itself
    np.testing.assert_array_equal(a, b)


def test_parse_size():
    assert parse_size("2G") == 2_000_000_000
    assert parse_size("500M") == 500_000_000
    assert parse_size("1234") == 1234
    assert parse_size(None) == 0


def test_sharded_bf16_source(tmp_path):
    src = make_tiny_llama(tmp_path / "bf16", TinySpec(kv_heads=2, tied=False, dtype="bfloat16",
                                                     max_shard_size="200KB", train_steps=10))
    assert (src / "model.safetensors.index.json").is_file()
    reader = CheckpointReader(src)
    assert len({i.file for i in reader.iter_infos()}) >= 3
    assert {i.dtype.torch for i in reader.iter_infos()} == {torch.bfloat16}
    out = tmp_path / "m.gguf"
    export_gguf(load_canonical(src), out, outtype="bf16", progress=False)
    ids = hf_ids(src, builtin_text(), 128)
    # transformers upcasts the bf16 weights to f32: a bf16 GGUF holds exactly those weights
    assert mean_kld(hf_logits(src, ids), llamacpp_logits(out, ids)) < 1e-4


def test_legacy_pytorch_bin_source(gqa_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    src = tmp_path / "bin"
    src.mkdir()
    for f in gqa_model.iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(gqa_model / "model.safetensors"), src / "pytorch_model.bin")
    a, b = load_canonical(gqa_model), load_canonical(src)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert torch.equal(ta.load(), tb.load())
    # rows of a .bin come back in new arrays, not the read buffers: read in many pieces, same file
    from mtool.convert import gguf_write
    from mtool.convert.gguf_export import export_gguf

    whole = tmp_path / "whole.gguf"
    export_gguf(a, whole, outtype="q8_0", progress=False, name="m")
    monkeypatch.setattr(gguf_write, "PIECE_BYTES", 3000)
    pieces = tmp_path / "pieces.gguf"
    export_gguf(b, pieces, outtype="q8_0", progress=False, name="m")
    assert pieces.read_bytes() == whole.read_bytes()


def test_hf_writer_round_trip(gqa_model, tmp_path):
    model = load_canonical(gqa_model)
    out = tmp_path / "copy"
    write_hf_checkpoint(out, model.config, model.tensors, max_shard_bytes=150_000, copy_from=gqa_model)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert (out / "tokenizer.model").is_file()
    copy = load_canonical(out)
    for ta, tb in zip(model.tensors, copy.tensors):
        assert ta.name == tb.name and torch.equal(ta.load(), tb.load())
    assert not [p for p in tmp_path.iterdir() if "mtool-tmp" in p.name]
    with pytest.raises(Exception, match="already exists"):
        write_hf_checkpoint(out, model.config, [])
