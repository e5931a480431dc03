"""File -> pinned host staging -> device: CUDA loads, and every `LoadPlan.fill` refill.

The host does no per-element work. Consecutive tensors of one file are read with one pread into
one of two pinned staging buffers (double-buffered: the host reads the next batch while the GPU
copies the last), each batch goes to the device with one `copy_(non_blocking=True)` on a copy
stream as raw file bytes, and the device casts each tensor from there into its destination
(file dtype -> run dtype, a device-to-device kernel at HBM speed). An event per host buffer
keeps it from being refilled before its host-to-device copy finished. Tensors larger than a
buffer are split at element boundaries, so the buffers stay a fixed few tens of MB.

pread rather than reading through a mapping: the kernel copies page-cache bytes straight into the
pinned pages, so no page table entries are built for a file that is read once.

`plan_batches` is pure arithmetic. On CPU destinations `stream_copy` runs synchronously with
plain buffers and no stream: `LoadPlan.fill` refills CPU buffers this way without mapping whole
files, and the tests check the batching without a GPU. `load_module` on CPU never comes here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from .filemap import check_size
from .safetensors_io import CheckpointError, TensorInfo

STAGING_BYTES = 32 << 20  # per host buffer; two of them, plus one device buffer of the same size
# CPU destinations: one buffer, read and cast from in place. Small, because a CPU refill exists to
# keep peak RSS near the region's size (memory/, sequential mode); 4 MiB preads stay efficient.
CPU_STAGING_BYTES = 4 << 20
_BATCH_ALIGN = 8  # batches start 8-aligned in the file, so aligned tensors stay aligned in staging


@dataclass(frozen=True)
class Segment:
    """Bytes [offset, offset + nbytes) of a batch fill elements [first, ...) of item `item`."""

    offset: int
    nbytes: int
    item: int
    first: int


@dataclass(frozen=True)
class Batch:
    """One contiguous byte range of one file, read with one pread and copied with one copy_."""

    path: Path
    start: int  # absolute file offset of the batch's first byte
    nbytes: int
    segments: tuple[Segment, ...]


def plan_batches(
    items: Sequence[tuple[TensorInfo, torch.dtype]], capacity: int = STAGING_BYTES
) -> list[Batch]:
    """Groups items (tensor bytes in a file, file dtype) in file order into batches of at most
    `capacity` bytes; an item that does not fit the rest of a batch is split at an element
    boundary and continues in the next one."""
    if capacity < 64 or capacity % _BATCH_ALIGN:
        raise ValueError(f"staging capacity must be a multiple of 8 of at least 64, got {capacity}")
    order = sorted(
        (i for i, (info, _) in enumerate(items) if info.nbytes),
        key=lambda i: (str(items[i][0].path), items[i][0].start),
    )
    batches: list[Batch] = []
    path: Path | None = None
    start = end = 0
    segments: list[Segment] = []
    for i in order:
        info, dtype = items[i]
        size = dtype.itemsize
        done = 0
        while done < info.nbytes:
            pos = info.start + done
            room = capacity - (pos - start)
            if info.path != path or room < size:
                if segments:
                    batches.append(Batch(path, start, end - start, tuple(segments)))
                path, start, segments = info.path, pos - pos % _BATCH_ALIGN, []
                room = capacity - (pos - start)
            n = min(info.nbytes - done, room // size * size)
            segments.append(Segment(pos - start, n, i, done // size))
            done += n
            end = pos + n
    if segments:
        batches.append(Batch(path, start, end - start, tuple(segments)))
    return batches


def _pread(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if not n:
            raise CheckpointError(f"{path}: file ends at byte {offset + done}, shorter than mapped")
        done += n


def stream_copy(
    items: Sequence[tuple[TensorInfo, torch.dtype, torch.Tensor]],
    device: torch.device,
    capacity: int | None = None,
) -> None:
    """Writes each item's file bytes (TensorInfo, file dtype) into its destination, a flat
    contiguous tensor on `device` of any float dtype (cast on the device) or of the file dtype.

    `capacity` is the size of each staging buffer (STAGING_BYTES for CUDA, CPU_STAGING_BYTES for
    the CPU when None). Returns once every copy has finished. Every file's size is checked before
    anything is read.
    """
    cuda = device.type == "cuda"
    if capacity is None:
        capacity = STAGING_BYTES if cuda else CPU_STAGING_BYTES
    batches = plan_batches([(info, dtype) for info, dtype, _ in items], capacity)
    if not batches:
        return
    size = max(b.nbytes for b in batches)
    with ExitStack() as stack:
        fds: dict[Path, int] = {}
        for b in batches:
            if b.path not in fds:
                fds[b.path] = os.open(b.path, os.O_RDONLY)
                stack.callback(os.close, fds[b.path])
        sizes = {path: os.fstat(fd).st_size for path, fd in fds.items()}
        for info, _, _ in items:
            if info.nbytes:
                check_size(info, sizes[info.path])
        host = [
            torch.empty(size, dtype=torch.uint8, pin_memory=cuda)
            for _ in range(min(2 if cuda else 1, len(batches)))
        ]
        # [size] file bytes on the device; on the CPU the host buffer itself is the source.
        staged = torch.empty(size, dtype=torch.uint8, device=device) if cuda else None
        stream = torch.cuda.Stream(device) if cuda else None
        if stream is not None:
            # The destinations and `staged` were allocated on the current stream.
            stream.wait_stream(torch.cuda.current_stream(device))
        copied: list[torch.cuda.Event | None] = [None] * len(host)
        for n, b in enumerate(batches):
            k = n % len(host)
            if copied[k] is not None:
                copied[k].synchronize()  # host buffer k's last upload is done: refill it
            buf = host[k][: b.nbytes]
            _pread(fds[b.path], memoryview(buf.numpy()), b.start, b.path)
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                if staged is not None:
                    staged[: b.nbytes].copy_(buf, non_blocking=True)
                if stream is not None:
                    copied[k] = torch.cuda.Event()
                    copied[k].record(stream)
                raw = buf if staged is None else staged
                for s in b.segments:
                    _, dtype, dst = items[s.item]
                    src = raw[s.offset : s.offset + s.nbytes]
                    out = dst[s.first : s.first + s.nbytes // dtype.itemsize]
                    if out.dtype == dtype:
                        out.view(torch.uint8).copy_(src)
                    else:
                        # A dtype view needs an element-aligned offset; safetensors files that
                        # mix dtypes can break that, and clone() starts a fresh aligned buffer.
                        src = src if s.offset % dtype.itemsize == 0 else src.clone()
                        out.copy_(src.view(dtype))
        if stream is not None:
            stream.synchronize()
