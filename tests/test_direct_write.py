"""The O_DIRECT sequential writer and the GGUF tensor-data writer built on it.

The GGUF files must be byte-identical to what gguf-py's own GGUFWriter.write_tensor_data
writes (single file and split shards, odd tensor sizes that need alignment padding)."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from mtool.convert.gguf_types import Q
from mtool.convert.gguf_write import write_header
from mtool.direct_write import BLOCK, SequentialWriter


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("buffer_bytes", [BLOCK, 3 * BLOCK, 1 << 20])
def test_sequential_writer_writes_every_byte_in_order(tmp_path, direct, buffer_bytes):
    rng = np.random.default_rng(0)
    # sizes around the block and buffer boundaries, one larger than two buffers, an odd tail
    sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 17, 2 * buffer_bytes + 5, 7, 12345]
    chunks = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    path = tmp_path / "out.bin"
    with SequentialWriter(path, buffer_bytes=buffer_bytes, direct=direct) as w:
        for c in chunks:
            w.write(c)
        assert w.position == sum(sizes)
    assert path.read_bytes() == b"".join(c.tobytes() for c in chunks)


def test_sequential_writer_falls_back_where_o_direct_is_refused(tmp_path):
    shm = "/dev/shm"  # tmpfs: open(O_DIRECT) fails with EINVAL
    target = tmp_path / "x.bin"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        target = os.path.join(shm, f"mtool-test-{os.getpid()}.bin")
    try:
        with SequentialWriter(target, buffer_bytes=BLOCK) as w:
            w.write(b"abc" * 5000)
        with open(target, "rb") as fh:
            assert fh.read() == b"abc" * 5000
    finally:
        if str(target).startswith(shm):
            os.unlink(target)


def test_sequential_writer_error_leaves_no_open_handle(tmp_path):
    w = SequentialWriter(tmp_path / "y.bin", buffer_bytes=BLOCK)
    w.write(b"x" * (BLOCK + 3))
    w.abort()
    w.close()  # after abort: nothing more happens
    with pytest.raises(ValueError):
        w.write(b"more")  # buffers are released


def _tensors():
    rng = np.random.default_rng(1)
    return [
        ("a.weight", rng.standard_normal(7).astype(np.float32), Q.F32),
        ("b.weight", rng.standard_normal((3, 5)).astype(np.float16), Q.F16),
        ("c.weight", rng.integers(0, 256, (4, 34), dtype=np.uint8), Q.Q8_0),  # 4 rows of 32 -> 34 bytes each
        ("d.weight", rng.standard_normal((64, 33)).astype(np.float32), Q.F32),
        ("e.weight", rng.integers(0, 2**16, (2, 3), dtype=np.uint16), Q.BF16),
        ("f.weight", rng.standard_normal((300, 128)).astype(np.float16), Q.F16),
    ]


def _torch_shape(arr: np.ndarray, q: Q) -> tuple[int, ...]:
    if q == Q.Q8_0:
        return (*arr.shape[:-1], arr.shape[-1] // 34 * 32)
    return tuple(arr.shape)


def _write(path, split_max_size: int, ours: bool) -> None:
    w = gguf.GGUFWriter(path, "llama", split_max_size=split_max_size)
    w.add_name("direct-write test")
    w.add_block_count(1)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "中文"])
    tensors = _tensors()
    if ours:
        data = write_header(w, [(n, _torch_shape(a, q), q) for n, a, q in tensors])
        with data:
            for _, a, _ in tensors:
                data.write(a)
    else:
        for n, a, q in tensors:
            w.add_tensor_info(n, a.shape, a.dtype, a.nbytes, raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, a, _ in tensors:
            w.write_tensor_data(a)
        w.close()


@pytest.mark.parametrize("split_max_size", [0, 5_000])
def test_tensor_data_is_byte_identical_to_gguf_py(tmp_path, split_max_size):
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    _write(tmp_path / "ours" / "m.gguf", split_max_size, ours=True)
    _write(tmp_path / "theirs" / "m.gguf", split_max_size, ours=False)
    ours = sorted(p.name for p in (tmp_path / "ours").iterdir())
    theirs = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert ours == theirs
    assert len(ours) == (1 if not split_max_size else 4)
    for name in ours:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name
    r = gguf.GGUFReader(tmp_path / "ours" / ours[0])
    np.testing.assert_array_equal(np.asarray(r.tensors[0].data), _tensors()[0][1])


def test_tensor_data_checks_sizes_and_count(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    data = write_header(w, [("a.weight", (4,), Q.F32), ("b.weight", (2,), Q.F32)])
    with pytest.raises(ValueError, match="announced 16"):
        data.write(np.zeros(3, np.float32))
    data.write(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="1 announced tensor"):
        data.close()


def _metadata(w: gguf.GGUFWriter) -> None:
    rng = np.random.default_rng(2)
    w.add_name("中文 model")
    w.add_token_list(["<s>", "▁中", "文", "\n", "", "a b"] * 50)
    w.add_token_scores([float(x) for x in rng.standard_normal(300)])
    w.add_token_types([int(x) for x in rng.integers(1, 6, 300)])
    w.add_token_merges(["▁ t", "h e"] * 10)
    w.add_array("test.uint32", [1, 2, 3])
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.floats", [0.5, -1.25, 3.0])
    w.add_array("test.bytes", [b"ab", b"\xff"])
    w.add_array("test.one", ["only"])
    w.add_key_value("test.u32s", [7, 8, 4294967295], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)


def test_fast_metadata_packing_is_byte_identical_to_gguf_py(tmp_path):
    from mtool.convert.gguf_write import new_writer

    files = {}
    for label, make in (("ours", new_writer), ("theirs", gguf.GGUFWriter)):
        path = tmp_path / f"{label}.gguf"
        w = make(path, "llama")
        _metadata(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        files[label] = path.read_bytes()
    assert files["ours"] == files["theirs"]
    r = gguf.GGUFReader(tmp_path / "ours.gguf")
    assert r.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<s>", "▁中", "文"]


@pytest.mark.parametrize("values", [[1, "two", 3.0], [1, 2, True], [0.5, 1], ["a"] * 100 + [b"b", 3]])
def test_fast_metadata_packing_refuses_what_gguf_py_refuses(tmp_path, values):
    from mtool.convert.gguf_write import new_writer

    for make in (gguf.GGUFWriter, new_writer):  # gguf-py refuses it too: the fast path must not accept it
        w = make(tmp_path / "x.gguf", "llama")
        w.add_array("test.mixed", values)
        with pytest.raises(ValueError, match="same type"):
            w.write_header_to_file()
            w.write_kv_data_to_file()
        w.close()
