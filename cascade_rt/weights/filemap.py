"""Checkpoint files as CPU tensors that share the page cache: the source of every CPU load.

A file is mapped copy-on-write (MAP_PRIVATE, mmap.ACCESS_COPY): its pages are the page cache's
own, nothing is copied, and a write to a weight (the model never writes one) would go to a
private page, never to the file. The mapping is writable, so `torch.frombuffer` takes it without
the read-only-buffer warning. Its page table entries are created by one
madvise(MADV_POPULATE_READ) call at map time (about 14 ms for a 2.8 GB file in the page cache on
this workplace's VM), so neither the loader's cast copies nor the first forward pass take page
faults on weights; without it the first read of every weight took ~2,900 faults (the page cache
holds large folios) spread over that pass.

The tensor keeps the mapping alive: views of it stay valid after the file object is closed, or
the file deleted. A file truncated after it was mapped makes reading past its new end a SIGBUS,
as with any mapped file (safetensors and diffusers share that), so sizes are checked at map time.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from .arena import MADV_POPULATE_READ, populate
from .safetensors_io import CheckpointError, TensorInfo


def map_file(path: Path) -> torch.Tensor:
    """The whole file as a uint8 CPU tensor over a private, populated mapping."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:  # mmap refuses empty files; a header-only file has no tensor bytes
                return torch.empty(0, dtype=torch.uint8)
            mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot map: {e}") from e
    populate(mapping, MADV_POPULATE_READ)
    return torch.frombuffer(mapping, dtype=torch.uint8)


def check_size(info: TensorInfo, file_size: int) -> None:
    """Raises when the tensor's bytes run past the end of a file of `file_size` bytes."""
    short = info.start + info.nbytes - file_size
    if short > 0:
        raise CheckpointError(f"{info.path}: key {info.name!r}: file ends {short} bytes early")


def tensor_bytes(mapped: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """The uint8 view of one tensor's bytes in its mapped file."""
    check_size(info, mapped.numel())
    return mapped[info.start : info.start + info.nbytes]
