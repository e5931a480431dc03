"""Static-buffer programs: each stage as one function over fixed buffers, replayed as a CUDA graph.

A *program* is one stage of a call (the text encoder, a whole sampling loop, the Stage A decode)
written over static input buffers. A call copies its values into those buffers (`copy_`) and
runs the program: on CUDA by replaying a graph captured once, elsewhere by running the same code
eagerly, so CPU tests exercise everything but the capture itself. What changes shapes or control
flow (batch, size, steps, guidance on/off, recipe, dtype) is the program's cache key; what only
changes values (noise, seeds, guidance scales, timesteps, prompts) is refilled before each run
and never recaptures.

    cache = ProgramCache(device, graphs=True, capacity=16)
    prog = cache.get(key, lambda: Program(name, inputs, body, graphs=..., pool=cache.pool))
    outputs = prog.run(x=..., noise=...)  # static outputs on CUDA: read before the next run

All graphs of a cache share one memory pool, so the peak activation memory of a call is its
largest program's, not the sum. Capture warms up on a side stream first, so Triton compilation,
cuBLAS handles and allocator growth stay out of the graph (stable-fast, gpt-fast).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("cascade_rt")

Outputs = dict[str, torch.Tensor]
Body = Callable[[Mapping[str, torch.Tensor]], Outputs]


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Program:
    """`body(inputs) -> outputs` over static input buffers, run eagerly or as a CUDA graph.

    `inputs` gives each static buffer's shape and dtype by example (the tensors become the
    buffers). With `graph=True` (CUDA only) the first `run` warms up on a side stream, captures
    `body` into `pool`, and later runs replay it: the returned tensors are then the same static
    outputs every time, overwritten by the next run.
    """

    def __init__(
        self,
        name: str,
        inputs: Mapping[str, torch.Tensor],
        body: Body,
        *,
        graph: bool,
        pool: Any = None,
    ) -> None:
        self.name = name
        self.inputs: dict[str, torch.Tensor] = dict(inputs)
        self.body = body
        devices = {t.device for t in self.inputs.values()}
        if len(devices) != 1:
            where = sorted(map(str, devices))
            raise ValueError(f"program {name}: static inputs span devices {where}")
        self.device = devices.pop()
        if graph and self.device.type != "cuda":
            raise ValueError(f"program {name}: CUDA graphs need a CUDA device, not {self.device}")
        self.graph_enabled = graph
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: Outputs | None = None
        self.capture_bytes = 0  # pool growth measured at capture (activations of this program)
        # Host time of the last run (fills plus replay launch; all of the work when eager).
        self.host_ms = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes this program holds: static inputs, static outputs and its capture's pool growth."""
        outputs = _nbytes(self.outputs) if self.graph is not None and self.outputs else 0
        return _nbytes(self.inputs) + outputs + self.capture_bytes

    def fill(self, values: Mapping[str, torch.Tensor]) -> None:
        """Copies `values` into the static inputs; every input must be given, with its shape."""
        missing = sorted(self.inputs.keys() - values.keys())
        unknown = sorted(values.keys() - self.inputs.keys())
        if missing or unknown:
            raise ValueError(f"program {self.name}: missing inputs {missing}, unknown {unknown}")
        for key, value in values.items():
            static = self.inputs[key]
            if tuple(value.shape) != tuple(static.shape):
                raise ValueError(
                    f"program {self.name}: input {key!r} expected shape {tuple(static.shape)}, "
                    f"got {tuple(value.shape)}"
                )
            static.copy_(value, non_blocking=True)

    def run(self, values: Mapping[str, torch.Tensor]) -> Outputs:
        """Fills the inputs and runs the body (replays its graph once captured)."""
        start = time.perf_counter()
        self.fill(values)
        if not self.graph_enabled:
            outputs = self.body(self.inputs)
        else:
            if self.graph is None:  # the body never writes its inputs: the fill stays valid
                self._capture()
                start = time.perf_counter()  # host_ms: the replay, not the one-time capture
            assert self.graph is not None and self.outputs is not None
            self.graph.replay()
            outputs = self.outputs
        self.host_ms = (time.perf_counter() - start) * 1e3
        return outputs

    def _capture(self) -> None:
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self.body(self.inputs)  # warm-up: JIT, library handles, allocator growth
        current.wait_stream(side)
        before = torch.cuda.memory_reserved(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs = self.body(self.inputs)
        self.capture_bytes = max(0, torch.cuda.memory_reserved(self.device) - before)
        self.graph = graph
        logger.info(
            "captured %s: %.1f MiB of static buffers, %.1f MiB pool growth",
            self.name,
            (_nbytes(self.inputs) + _nbytes(self.outputs)) / 2**20,
            self.capture_bytes / 2**20,
        )

    def release(self) -> None:
        """Drops the graph and the static buffers."""
        if self.graph is not None:
            self.graph.reset()
        self.graph, self.outputs, self.inputs = None, None, {}


@dataclass(frozen=True)
class CacheInfo:
    entries: int
    capacity: int
    nbytes: int  # static buffers plus measured capture growth of every cached program
    hits: int
    misses: int
    evictions: int
    keys: tuple[Hashable, ...]


class ProgramCache:
    """A bounded LRU of programs on one device, sharing one graph memory pool.

    `graphs=None` means graphs on CUDA and eager elsewhere; `graphs=True` on a non-CUDA device is
    an error.
    """

    def __init__(self, device: torch.device, *, graphs: bool | None = None, capacity: int = 16):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"graph cache capacity must be a positive int, got {capacity!r}")
        self.device = torch.device(device)
        if graphs is None:
            graphs = self.device.type == "cuda"
        if graphs and self.device.type != "cuda":
            raise ValueError(
                f"graphs=True needs a CUDA device; this pipeline runs on {self.device} "
                "(use graphs=False or None)"
            )
        self.graphs = bool(graphs)
        self.capacity = capacity
        self.pool = torch.cuda.graph_pool_handle() if self.graphs else None
        self._programs: OrderedDict[Hashable, Program] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable, build: Callable[[], Program]) -> Program:
        """The cached program for `key`, or `build()`'s, evicting the least recently used."""
        if key in self._programs:
            self.hits += 1
            self._programs.move_to_end(key)
            return self._programs[key]
        self.misses += 1
        program = build()
        self._programs[key] = program
        while len(self._programs) > self.capacity:
            old_key, old = self._programs.popitem(last=False)
            old.release()
            self.evictions += 1
            logger.info("graph cache full (%d): evicted %s", self.capacity, old_key)
        return program

    def clear(self) -> None:
        for program in self._programs.values():
            program.release()
        self._programs.clear()

    def info(self) -> CacheInfo:
        return CacheInfo(
            entries=len(self._programs),
            capacity=self.capacity,
            nbytes=sum(p.nbytes for p in self._programs.values()),
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            keys=tuple(self._programs),
        )
