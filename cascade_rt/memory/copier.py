"""Host-to-device weight copies: a side stream and events on CUDA, plain `copy_` on the CPU.

On CUDA every copy goes on one copy stream. Before writing into a buffer the copy stream waits
for an event recorded on the compute stream (the work that last read the buffer was queued
before it), and the compute stream waits for the copy's own event before reading. Both are
plain stream-ordered dependencies, so they are legal inside CUDA-graph capture: the capture
forks into the copy stream and joins back, and the graph replays the copies with it. Events
are fresh per use, so nothing ever waits on an event recorded outside the current capture.

On the CPU "device" copies are synchronous and every event is None: the same call sequence
runs, which is what lets the CPU tests check the planners' scheduling.
"""

from __future__ import annotations

import time

import torch

_MAX_PENDING = 4096  # timing event pairs kept before completed ones are summed


class Copier:
    """Counts bytes, copies and time; `copy` returns the event that marks the copy done."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.bytes = 0
        self.copies = 0
        self._ms = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def after_compute(self) -> None:
        """Copies issued from now on start after the work queued so far on the compute stream."""
        if self.cuda:
            done = torch.cuda.Event()
            done.record(self._compute_stream())
            self.stream.wait_event(done)

    @torch.no_grad()
    def copy(self, dst: torch.Tensor, src: torch.Tensor, chunk: int = 0) -> torch.cuda.Event | None:
        """dst.copy_(src) for uint8 buffers of equal size, in `chunk`-byte pieces when > 0."""
        n = dst.numel()
        self.bytes += n
        self.copies += 1
        step = chunk if chunk > 0 else max(n, 1)
        if not self.cuda:
            start = time.perf_counter()
            for off in range(0, n, step):
                dst[off : off + step].copy_(src[off : off + step])
            self._ms += (time.perf_counter() - start) * 1e3
            return None
        timed = not torch.cuda.is_current_stream_capturing()
        begin = torch.cuda.Event(enable_timing=timed)
        end = torch.cuda.Event(enable_timing=timed)
        with torch.cuda.stream(self.stream):
            begin.record(self.stream)
            for off in range(0, n, step):
                dst[off : off + step].copy_(src[off : off + step], non_blocking=True)
            end.record(self.stream)
        if timed:
            self._pending.append((begin, end))
            if len(self._pending) > _MAX_PENDING:
                self._drain(block=False)
        return end

    def record_sync(self, nbytes: int, seconds: float) -> None:
        """Counts a copy done synchronously elsewhere (the CPU region re-read from files)."""
        self.bytes += nbytes
        self.copies += 1
        self._ms += seconds * 1e3

    def wait(self, ready: torch.cuda.Event | None) -> None:
        """The compute stream reads the copied bytes only after `ready`."""
        if ready is not None:
            self._compute_stream().wait_event(ready)

    def join(self) -> None:
        """The compute stream waits for everything issued on the copy stream (ends a capture's
        fork even when a prefetched copy was never read)."""
        if self.cuda:
            done = torch.cuda.Event()
            done.record(self.stream)
            self._compute_stream().wait_event(done)

    def _drain(self, block: bool) -> None:
        keep = []
        for begin, end in self._pending:
            if block:
                end.synchronize()
            if block or end.query():
                self._ms += begin.elapsed_time(end)
            else:
                keep.append((begin, end))
        self._pending = keep

    def copy_ms(self) -> float:
        """Total time spent copying (waits for outstanding copies; CUDA copies issued during a
        graph capture, and their replays, are not timed)."""
        if self.cuda and not torch.cuda.is_current_stream_capturing():
            self._drain(block=True)
        return self._ms
