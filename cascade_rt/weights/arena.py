"""One allocation for all the weights of a module, handed out as typed views (llm.c style).

A single uint8 buffer per load means one allocator call, no fragmentation, one `nbytes` to report,
and a layout the loader can fill with a few large copies. Views start at aligned offsets so every
dtype view is legal and vector loads in kernels stay aligned.

On CPU the buffer is an anonymous mapping whose pages are all created by one
madvise(MADV_POPULATE_WRITE) call instead of one page fault per 4 KiB while it is filled.
Measured for a 2.8 GB buffer on this workplace's VM (2 shared cores, kernel 6.18, THP "madvise";
bench/bench_load.py `arena_alloc` rows and stand-alone runs, bench/NOTES.md "Loading"): populate
0.86-1.25 s with 0.8-0.95 s of system time; torch.empty + fill_ 0.74-1.40 s with 1.1-1.4 s (its
faults run on two threads, so wall time is no better on a loaded machine, CPU time is worse);
MADV_HUGEPAGE + populate 1.5-10.4 s (the kernel compacts memory to find 2 MiB pages), so huge
pages are not asked for. The floor is the kernel zeroing fresh pages (~3 GB/s here), which is why
an arena is only used for tensors that cannot be views of the file (see loader.py).

Several modules sharing one arena later only needs their specs concatenated (prefixing names)
before the allocation; nothing here assumes one module.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Mapping, Sequence

import torch

ALIGNMENT = 256  # bytes; the CUDA allocator's own granularity, and a multiple of every dtype size
# Linux 5.14+; Python's mmap module has no names for them. Older kernels answer EINVAL, and the
# pages are then created by faults as they are first written, which is only slower.
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

Specs = Mapping[str, tuple[Sequence[int], torch.dtype]]


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * dtype.itemsize


def arena_layout(specs: Specs, alignment: int = ALIGNMENT) -> tuple[dict[str, int], int]:
    """Byte offset of each named tensor, in the given order, and the total size; allocates
    nothing (a memory planner sizes its buffers with this)."""
    if alignment <= 0 or alignment % 8:
        raise ValueError(f"Arena alignment must be a positive multiple of 8, got {alignment}")
    offsets: dict[str, int] = {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        offset = -(-offset // alignment) * alignment
        offsets[name] = offset
        offset += nbytes_of(shape, dtype)
    return offsets, offset


def populate(mapping: mmap.mmap, advice: int) -> None:
    """Creates every page table entry of `mapping` in one call (MADV_POPULATE_READ/WRITE)."""
    # A kernel without MADV_POPULATE_* refuses (EINVAL): pages then fault in on first use.
    with contextlib.suppress(OSError):
        mapping.madvise(advice)


def cpu_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` whose pages already exist (see the module docstring)."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    populate(mapping, MADV_POPULATE_WRITE)
    # The tensor holds a reference to the mapping; it is unmapped when the last view is freed.
    return torch.frombuffer(mapping, dtype=torch.uint8)


class Arena:
    """A uint8 buffer on `device` with one typed, contiguous view per named tensor.

    specs: {name: (shape, dtype)}, laid out in the given order.
    """

    def __init__(
        self, specs: Specs, device: torch.device | str, *, alignment: int = ALIGNMENT
    ) -> None:
        self.device = torch.device(device)
        self.offsets, self.nbytes = arena_layout(specs, alignment)
        if self.device.type == "cpu":
            self.buffer: torch.Tensor | None = cpu_buffer(self.nbytes)
        else:
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        self.views: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in specs.items():
            start = self.offsets[name]
            raw = self.buffer[start : start + nbytes_of(shape, dtype)]
            self.views[name] = raw.view(dtype).view(tuple(shape))

    def release(self) -> None:
        """Drops the buffer and the views; memory returns once no one else holds a view."""
        self.buffer = None
        self.views = {}

    def __repr__(self) -> str:
        return f"Arena({len(self.offsets)} tensors, {self.nbytes} bytes on {self.device})"
