"""safetensors headers, parsed and checked by hand, and an atomic single-file writer.

Format: 8-byte little-endian header length N, N bytes of UTF-8 JSON
`{name: {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`,
then the data; offsets are relative to the first byte after the header. Reading the header
ourselves lets the loader check every key, shape and dtype before it allocates anything, and lets
it read tensor bytes straight into arena views.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

# Bytes per element of every dtype code safetensors defines with a whole-byte size. Codes missing
# here (sub-byte floats) are still parsed; their byte size is not checked and they cannot be loaded.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip

# Float weights load from these codes only; other floats (F64, F8) are refused by name.
FLOAT_CODES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# Integer buffers (BatchNorm's num_batches_tracked is I64 in stage_a.safetensors).
INT_CODES: dict[str, torch.dtype] = {
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
}
_CODE_OF: dict[torch.dtype, str] = {
    **{dt: code for code, dt in FLOAT_CODES.items()},
    **{dt: code for code, dt in INT_CODES.items()},
    torch.float64: "F64",
    torch.bool: "BOOL",
}

# safetensors itself refuses headers above 100 MB; a larger length means a corrupt file.
MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A checkpoint file or folder is unreadable, inconsistent, or does not fit the model."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a safetensors header, with absolute byte positions in its file."""

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int
    path: Path


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, str]


def code_of(dtype: torch.dtype) -> str:
    """safetensors dtype code of a torch dtype."""
    try:
        return _CODE_OF[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be written to safetensors here") from None


def _no_duplicates(path: Path):
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{path}: header lists key {key!r} twice")
            out[key] = value
        return out

    return hook


def _is_int_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parses and validates the header of one .safetensors file; reads no tensor data."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: file is {file_size} bytes, shorter than the 8-byte header length"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > file_size:
                raise CheckpointError(
                    f"{path}: header length {n} runs past the end of the {file_size}-byte file"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is a JSON {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")

    data_start = 8 + n
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: key {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise CheckpointError(f"{where}: dtype {dtype!r} is not a string")
        if not _is_int_list(shape) or any(d < 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of sizes")
        if not _is_int_list(offsets) or len(offsets) != 2:
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] out of range of the {data_len}-byte data"
            )
        if dtype in ITEMSIZE:
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * ITEMSIZE[dtype]:
                raise CheckpointError(
                    f"{where}: {end - begin} bytes do not match shape {shape} x {dtype} "
                    f"({numel * ITEMSIZE[dtype]} bytes)"
                )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin, path)

    spans = sorted((t.start, t.start + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, prev_end, prev), (begin, _, name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise CheckpointError(f"{path}: data of key {name!r} overlaps key {prev!r}")
    return SafetensorsHeader(path, tensors, metadata)


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> None:
    """Writes one .safetensors file atomically (temp file in the same folder, then os.replace).

    Float tensors are cast to `dtype` when given. Tensors may be views sharing storage (the q/k/v
    slices of a fused in_proj weight); each is written from its own contiguous CPU copy, one at a
    time, so extra memory stays at one tensor.
    """
    path = Path(path)
    names = sorted(tensors)

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * out_dtype(t).itemsize
        header[name] = {
            "dtype": code_of(out_dtype(t)),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads with spaces so the data starts 8-aligned

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                t = tensors[name].detach()
                t = t.to(device="cpu", dtype=out_dtype(t)).contiguous()
                if t.numel():
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
