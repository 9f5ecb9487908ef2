"""Our safetensors reader/writer against the official library, plus error sentences and digests."""
from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from casa_core.errors import CasaError
from casa_core.formats.safetensors_io import SafeTensorsFile, StreamingWriter, file_digest, write_file


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 5, generator=g)
    return {
        "f64": f.double(),
        "f32": f,
        "f16": f.half(),
        "bf16": f.bfloat16(),
        "f8e4m3": f.to(torch.float8_e4m3fn),
        "f8e5m2": f.to(torch.float8_e5m2),
        "i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "i32": torch.arange(4, dtype=torch.int32),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (works for fp8 and bool too)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_reads_files_written_by_the_official_library(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "official.safetensors"
    save_file(tensors, str(path), metadata={"who": "official"})
    with SafeTensorsFile(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        assert f.metadata == {"who": "official"}
        for key, t in tensors.items():
            assert f.shape(key) == tuple(t.shape)
            assert f.dtype(key) == t.dtype
            assert f.nbytes(key) == t.numel() * t.element_size()
            assert same(f.get(key), t), key


def test_keys_are_in_file_order(tmp_path):
    path = tmp_path / "order.safetensors"
    save_file({"b": torch.zeros(2), "a": torch.zeros(3), "c": torch.zeros(1)}, str(path))
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + header_len])
    header.pop("__metadata__", None)
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    with SafeTensorsFile(path) as f:
        assert f.keys() == by_offset


def test_get_returns_tensors_that_own_their_memory(tmp_path):
    path = tmp_path / "own.safetensors"
    save_file({"x": torch.ones(4)}, str(path))
    f = SafeTensorsFile(path)
    first = f.get("x")
    first.mul_(5)
    assert torch.equal(f.get("x"), torch.ones(4))
    f.close()
    assert torch.equal(first, torch.full((4,), 5.0))


def test_write_file_loads_with_the_official_library(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "ours.safetensors"
    write_file(path, tensors, metadata={"k": "v"})
    loaded = load_file(str(path))
    assert sorted(loaded) == sorted(tensors)
    for key, t in tensors.items():
        assert same(loaded[key], t), key
    with SafeTensorsFile(path) as f:
        assert f.metadata == {"k": "v"}
        for key, t in tensors.items():
            assert same(f.get(key), t), key


def test_streaming_writer_any_order_and_dtype_conversion(tmp_path):
    path = tmp_path / "stream.safetensors"
    a = torch.randn(4, 3)
    b = torch.randn(2)
    entries = [("a", torch.float16, (4, 3)), ("b", torch.float32, (2,))]
    with StreamingWriter(path, entries, {"m": "1"}) as w:
        assert os.path.exists(f"{path}.partial-{os.getpid()}")
        assert not path.exists()
        w.write("b", b)
        w.write("a", a)  # float32 in, stored as declared float16
    loaded = load_file(str(path))
    assert loaded["a"].dtype == torch.float16
    assert torch.equal(loaded["a"], a.half())
    assert torch.equal(loaded["b"], b)
    assert not os.path.exists(f"{path}.partial-{os.getpid()}")


def test_streaming_writer_checks_shapes_and_completeness(tmp_path):
    path = tmp_path / "bad.safetensors"
    w = StreamingWriter(path, [("a", torch.float32, (2, 2)), ("b", torch.float32, (1,))])
    with pytest.raises(ValueError, match="shape"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="not declared"):
        w.write("zzz", torch.zeros(1))
    w.write("a", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="never written"):
        w.commit()
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_streaming_write_leaves_no_file(tmp_path):
    path = tmp_path / "interrupted.safetensors"
    path_existing = tmp_path / "existing.safetensors"
    with pytest.raises(RuntimeError, match="stop"), \
            StreamingWriter(path, [("a", torch.float32, (2,)), ("b", torch.float32, (2,))]) as w:
        w.write("a", torch.zeros(2))
        raise RuntimeError("stop")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
    # An interrupted overwrite keeps the old file intact.
    save_file({"old": torch.ones(1)}, str(path_existing))
    with pytest.raises(KeyboardInterrupt), StreamingWriter(path_existing, [("new", torch.float32, (1,))]):
        raise KeyboardInterrupt
    assert sorted(load_file(str(path_existing))) == ["old"]


# -- error sentences --------------------------------------------------------------------------------------


def write_raw(path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CasaError) as e:
        SafeTensorsFile(path)
    assert str(e.value) == f"{path} does not exist"
    assert e.value.file == str(path)


def test_too_short_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"abc")
    with pytest.raises(CasaError) as e:
        SafeTensorsFile(path)
    assert str(e.value) == f"{path} is not a safetensors file (it is only 3 bytes long)"


def test_absurd_header_length(tmp_path):
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"\x00" * 60)
    with pytest.raises(CasaError) as e:
        SafeTensorsFile(path)
    assert str(e.value).startswith(f"{path} is not a safetensors file (its header length ")


@pytest.mark.parametrize("head", [b"PK\x03\x04", b"\x80\x02\x8a\x0a"], ids=["torch-save-zip", "bare-pickle"])
def test_a_pickle_file_is_named_as_one(tmp_path, head):
    """torch.save's zip and an older bare pickle (protocol 2, what .ckpt / .bin / .pt files hold) are said to be
    pickles, with the way out; nothing of them is unpickled."""
    path = tmp_path / "lora.pt"
    path.write_bytes(head + b"\x00" * 60)
    with pytest.raises(CasaError) as e:
        SafeTensorsFile(path)
    assert str(e.value).startswith(f"{path} is not a safetensors file (it is a PyTorch pickle file"), str(e.value)
    assert "convert it to .safetensors" in str(e.value)


def test_header_not_json(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{{" + b"\x00" * 8)
    with pytest.raises(CasaError) as e:
        SafeTensorsFile(path)
    assert str(e.value) == f"{path} is not a safetensors file (its header is not JSON)"


def test_truncated_file(tmp_path):
    path = tmp_path / "trunc.safetensors"
    save_file({"a": torch.zeros(10), "b": torch.zeros(100)}, str(path))
    full = path.read_bytes()
    path.write_bytes(full[:-40])
    header_len = struct.unpack("<Q", full[:8])[0]
    b_end = json.loads(full[8:8 + header_len])["b"]["data_offsets"][1]
    with pytest.raises(CasaError) as e:
        SafeTensorsFile(path)
    assert str(e.value) == (f"{path} is truncated: tensor 'b' needs bytes up to {8 + header_len + b_end} "
                            f"but the file has only {len(full) - 40}")


def test_unknown_dtype(tmp_path):
    path = tmp_path / "dtype.safetensors"
    write_raw(path, {"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, b"\x00")
    with pytest.raises(CasaError, match=r"tensor 'x' has dtype 'F4', which this reader does not support"):
        SafeTensorsFile(path)


def test_shape_and_offsets_disagree(tmp_path):
    path = tmp_path / "size.safetensors"
    write_raw(path, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8)
    with pytest.raises(CasaError) as e:
        SafeTensorsFile(path)
    assert str(e.value) == f"{path}: tensor 'x' is [3] F32 (12 bytes) but its data_offsets span 8 bytes"


# -- digests ----------------------------------------------------------------------------------------------


def blake(path) -> str:
    return hashlib.blake2b(open(path, "rb").read(), digest_size=20).hexdigest()


def test_file_digest_is_blake2b_of_the_content(tmp_path):
    path = tmp_path / "d.bin"
    path.write_bytes(os.urandom(100_000))
    assert file_digest(path) == blake(path)
    assert file_digest(path, tmp_path / "memo") == blake(path)


def test_file_digest_memo_is_used_and_invalidated(tmp_path):
    path = tmp_path / "d.bin"
    memo = tmp_path / "memo"
    path.write_bytes(b"a" * 1000)
    st = os.stat(path)
    assert file_digest(path, memo) == blake(path)

    memo_file = memo / "file_digests.json"
    data = json.loads(memo_file.read_text())
    assert len(data) == 1 and str(tmp_path) not in memo_file.read_text()  # keyed without the path in clear
    (slot,) = data
    data[slot]["digest"] = "memoised"
    memo_file.write_text(json.dumps(data))
    assert file_digest(path, memo) == "memoised"  # same size and mtime: the memo answers

    path.write_bytes(b"b" * 1000)  # same size, new content and a new mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert file_digest(path, memo) == blake(path)
    assert json.loads(memo_file.read_text())[slot]["digest"] == blake(path)
