"""safetensors header parsing, corruption handling, our writer, and the arena."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cascade_rt.weights import Arena, CheckpointError, read_header
from cascade_rt.weights.safetensors_io import write_safetensors


def _raw_file(path: Path, header: object, data: bytes = b"", *, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def test_reads_files_written_by_the_safetensors_library(tmp_path: Path) -> None:
    tensors = {
        "a.weight": torch.randn(3, 5),
        "b.bias": torch.randn(7).to(torch.bfloat16),
        "c": torch.zeros((), dtype=torch.int64),
        "d": torch.randn(2, 2).half(),
    }
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "x.safetensors")
    assert header.metadata == {"format": "pt"}
    assert {k: (v.dtype, v.shape) for k, v in header.tensors.items()} == {
        "a.weight": ("F32", (3, 5)),
        "b.bias": ("BF16", (7,)),
        "c": ("I64", ()),
        "d": ("F16", (2, 2)),
    }
    raw = (tmp_path / "x.safetensors").read_bytes()
    info = header.tensors["a.weight"]
    got = torch.frombuffer(
        bytearray(raw[info.start : info.start + info.nbytes]), dtype=torch.float32
    )
    assert torch.equal(got.view(3, 5), tensors["a.weight"])


def test_our_writer_is_read_by_the_safetensors_library(tmp_path: Path) -> None:
    fused = torch.randn(6, 4)
    tensors = {"q": fused[0:2], "k": fused[2:4], "n": torch.tensor(3), "t": fused.t()}
    write_safetensors(tensors, tmp_path / "x.safetensors", dtype=torch.bfloat16)
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            want = t.bfloat16() if t.is_floating_point() else t
            assert torch.equal(f.get_tensor(name), want), name
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_file_shorter_than_8_bytes(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*shorter than the 8-byte"):
        read_header(tmp_path / "x.safetensors")


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "x.safetensors", {}, length=1 << 20)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: header length 1048576 runs past"):
        read_header(path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b'{"a": \xff}', "not valid UTF-8 JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "'a' twice"),
        (json.dumps({"a": {"dtype": "F32", "shape": [1]}}).encode(), "'a': entry needs"),
        (json.dumps({"a": _entry("F32", [-1], 0, 4)}).encode(), "'a': shape"),
        (json.dumps({"__metadata__": {"k": 1}}).encode(), "__metadata__"),
    ],
)
def test_malformed_header(tmp_path: Path, header: bytes, message: str) -> None:
    path = _raw_file(tmp_path / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors") as e:
        read_header(path)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"w": _entry("F32", [2], 0, 12)}, "key 'w': data_offsets [0, 12] out of range"),
        ({"w": _entry("F32", [2], 4, 2)}, "key 'w': data_offsets [4, 2] out of range"),
        ({"w": _entry("F32", [3], 0, 8)}, "key 'w': 8 bytes do not match shape [3] x F32"),
        ({"w": _entry("BF16", [2], 0, 8)}, "key 'w': 8 bytes do not match shape [2] x BF16"),
        ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [1], 4, 8)}, "'b' overlaps key 'a'"),
    ],
)
def test_bad_offsets(tmp_path: Path, entries: dict[str, object], message: str) -> None:
    path = _raw_file(tmp_path / "off.safetensors", entries, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"off\.safetensors") as e:
        read_header(path)
    assert message in str(e.value)


def test_unknown_and_unsupported_dtypes_parse(tmp_path: Path) -> None:
    # Refusal happens at load time, and only for keys a model needs.
    entries = {"d": _entry("F64", [1], 0, 8), "x": _entry("F4", [2], 8, 9)}
    header = read_header(_raw_file(tmp_path / "x.safetensors", entries, b"\0" * 9))
    assert header.tensors["d"].dtype == "F64"
    assert header.tensors["x"].nbytes == 1


def test_arena_views_are_aligned_typed_and_disjoint() -> None:
    specs = {
        "a": ((3,), torch.float32),
        "b": ((5, 2), torch.bfloat16),
        "n": ((), torch.int64),
        "e": ((0, 4), torch.float16),
    }
    arena = Arena(specs, "cpu")
    assert arena.offsets == {"a": 0, "b": 256, "n": 512, "e": 768}
    assert arena.nbytes == 768
    base = arena.buffer.data_ptr()
    for name, (shape, dtype) in specs.items():
        v = arena.views[name]
        assert (v.shape, v.dtype, v.is_contiguous()) == (torch.Size(shape), dtype, True)
        if v.numel():  # an empty tensor reports data_ptr 0
            assert (v.data_ptr() - base) % 256 == 0
    arena.views["a"].fill_(1.0)
    arena.views["b"].fill_(2.0)
    arena.views["n"].fill_(7)
    assert arena.views["a"].tolist() == [1.0, 1.0, 1.0] and int(arena.views["n"]) == 7
    arena.release()
    assert arena.buffer is None and arena.views == {}
