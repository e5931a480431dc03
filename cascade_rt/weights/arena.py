"""One allocation for all the weights of a module, handed out as typed views (llm.c style).

A single uint8 buffer per load means one allocator call, no fragmentation, one `nbytes` to report,
and a layout the loader can fill by reading file bytes straight into it. Views start at aligned
offsets so every dtype view is legal and vector loads in kernels stay aligned.

Today the loader makes one arena per module load. Several modules sharing one device arena later
only needs their specs concatenated (prefixing names) before the allocation; nothing here assumes
one module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

ALIGNMENT = 256  # bytes; the CUDA allocator's own granularity, and a multiple of every dtype size


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel * dtype.itemsize


class Arena:
    """A uint8 buffer on `device` with one typed, contiguous view per named tensor.

    specs: {name: (shape, dtype)}, laid out in the given order.
    """

    def __init__(
        self,
        specs: Mapping[str, tuple[Sequence[int], torch.dtype]],
        device: torch.device | str,
        *,
        alignment: int = ALIGNMENT,
    ) -> None:
        if alignment <= 0 or alignment % 8:
            raise ValueError(f"Arena alignment must be a positive multiple of 8, got {alignment}")
        self.device = torch.device(device)
        self.offsets: dict[str, int] = {}  # byte offset of each view in the buffer
        offset = 0
        for name, (shape, dtype) in specs.items():
            offset = -(-offset // alignment) * alignment
            self.offsets[name] = offset
            offset += _nbytes(shape, dtype)
        self.nbytes = offset
        self.buffer: torch.Tensor | None = torch.empty(
            self.nbytes, dtype=torch.uint8, device=self.device
        )
        self.views: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in specs.items():
            start = self.offsets[name]
            raw = self.buffer[start : start + _nbytes(shape, dtype)]
            self.views[name] = raw.view(dtype).view(tuple(shape))

    def release(self) -> None:
        """Drops the buffer and the views; memory returns once no one else holds a view."""
        self.buffer = None
        self.views = {}

    def __repr__(self) -> str:
        return f"Arena({len(self.offsets)} tensors, {self.nbytes} bytes on {self.device})"
