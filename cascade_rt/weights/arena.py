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
        self._spans: dict[str, tuple[int, int]] = {}  # name -> (byte offset, nbytes)
        offset = 0
        for name, (shape, dtype) in specs.items():
            offset = -(-offset // alignment) * alignment
            size = _nbytes(shape, dtype)
            self._spans[name] = (offset, size)
            offset += size
        self.nbytes = offset
        self.buffer: torch.Tensor | None = torch.empty(
            self.nbytes, dtype=torch.uint8, device=self.device
        )
        self.views: dict[str, torch.Tensor] = {
            name: self._bytes(name).view(dtype).view(tuple(shape))
            for name, (shape, dtype) in specs.items()
        }

    def _bytes(self, name: str) -> torch.Tensor:
        if self.buffer is None:
            raise RuntimeError("Arena was released")
        offset, size = self._spans[name]
        return self.buffer[offset : offset + size]

    def raw(self, name: str) -> torch.Tensor:
        """The uint8 bytes behind view `name` (a 1-D slice of the buffer)."""
        return self._bytes(name)

    def release(self) -> None:
        """Drops the buffer and the views; memory returns once no one else holds a view."""
        self.buffer = None
        self.views = {}

    def __repr__(self) -> str:
        return f"Arena({len(self._spans)} tensors, {self.nbytes} bytes on {self.device})"
