"""MemoryPlanner: where each stage's weights live, and the one call the pipeline makes per stage.

    planner = MemoryPlanner("auto", device, {"prior": StageWeights(meta_unet, source, dtype), ...})
    with planner.use("prior") as prior:   # weights valid on the device inside the block
        eps = prior(sample=x, timestep_ratio=r, **cond)
    planner.report()                      # mode, why, peak bytes, bytes copied, copy ms, ...

Every stage is checked (keys, shapes, dtypes; file headers only) before anything is allocated.

Sequential: one device region sized for the largest swapped stage; every swapped stage's
parameters are permanent views into it (they alias each other), so a CUDA graph captured while
a stage is entered stays valid whenever it is entered again. Entering a stage that is not in
the region copies its bytes in: on CUDA from its pinned host copy, in 64 MiB chunks on the copy
stream, the compute stream waiting on an event; on the CPU the region is host memory and the
stage is re-read from its checkpoint files (or copied from its state dict), so only the running
stage is in RAM. Re-entering the stage already in the region copies nothing. Stage A stays
resident (`KEEP_RESIDENT`). Graphs of a swapped stage must only be replayed inside its `use`.

Streaming: see cascade_rt/memory/streaming.py; `use` only hands out the module there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from cascade_rt.memory.copier import Copier
from cascade_rt.memory.modes import (
    KEEP_RESIDENT,
    STAGE_NAMES,
    check_request,
    choose_mode,
    peak_bytes,
)
from cascade_rt.memory.streaming import Streamer
from cascade_rt.memory.weights import StagePlan, StageWeights, assign, carve, pack, plan_stage

logger = logging.getLogger("cascade_rt")
CHUNK_BYTES = 64 << 20  # region copies go out in pieces of this size


def _on_device(sp: StagePlan, device: torch.device) -> bool:
    """A loaded module already holding its own weights on `device` (nothing to place)."""
    tensors = list(sp.module.state_dict().values())
    return bool(tensors) and all(t.device == device and not t.is_meta for t in tensors)


@dataclass(frozen=True, eq=False)
class _Swapped:
    """A sequential-mode stage: its views into the region and its host copy (CUDA: pinned bytes
    in region layout; CPU: `refill`, which re-reads the files or copies the state dict)."""

    views: dict[str, torch.Tensor]
    nbytes: int
    host: torch.Tensor | None = None
    refill: Callable[[Mapping[str, torch.Tensor]], None] | None = None


class MemoryPlanner:
    """Places the stages' weights as `mode` says ("auto", "resident", "sequential", "streaming").

    `stages` maps stage names ("text_encoder", "prior", "decoder", "vqgan"; any subset) to their
    weights. `n_slots` is the number of streaming slots (>= 1; 2 double-buffers).
    """

    def __init__(
        self,
        mode: str,
        device: torch.device | str,
        stages: Mapping[str, StageWeights],
        *,
        n_slots: int = 2,
        reason: str | None = None,
    ) -> None:
        """`reason`: why `mode` was picked, when the caller already resolved "auto" itself."""
        check_request(mode)
        if unknown := sorted(set(stages) - set(STAGE_NAMES)):
            raise ValueError(
                f"unknown stage names {unknown}; the planner knows {', '.join(STAGE_NAMES)}"
            )
        if not stages:
            raise ValueError("MemoryPlanner needs at least one stage")
        if not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots must be a positive integer, got {n_slots!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        plans = {name: plan_stage(name, stage) for name, stage in stages.items()}
        self.stage_bytes = {name: sp.nbytes for name, sp in plans.items()}
        self.mode, self.why = choose_mode(mode, self.device, self.stage_bytes)
        if reason is not None:
            self.why = reason
        logger.info("memory mode %s: %s", self.mode, self.why)
        self.modules: dict[str, nn.Module] = {name: sp.module for name, sp in plans.items()}
        self.copier = Copier(self.device)
        self.n_slots = n_slots
        self._placement: dict[str, str] = {}
        self._resident_bytes: dict[str, int] = {}
        self._device_bytes = 0  # device memory holding weights (allocated here or found there)
        self._host_bytes = 0  # host copies the planner made (pinned on CUDA)
        self._region: torch.Tensor | None = None
        self._swapped: dict[str, _Swapped] = {}
        self._in_region: str | None = None
        self._entered: str | None = None
        self._streamer: Streamer | None = None

        swapped = {n: sp for n, sp in plans.items() if n not in KEEP_RESIDENT}
        if self.mode == "resident" or (self.mode == "sequential" and not swapped):
            self._place_resident(plans)
        elif self.mode == "sequential":
            self._place_resident({n: sp for n, sp in plans.items() if n in KEEP_RESIDENT})
            self._place_region(swapped)
        else:
            self._streamer = Streamer(plans, self.device, n_slots, self.copier)
            for name in plans:
                self._placement[name] = "streamed" if self._streamer.streams(name) else "resident"
                self._resident_bytes[name] = self._streamer.resident_bytes(name)
            self._device_bytes = self._streamer.device_bytes()
            self._host_bytes = self._streamer.host_bytes()
        for module in self.modules.values():
            module.eval()

    # ---------------------------------------------------------------- placement
    def _place_resident(self, plans: Mapping[str, StagePlan]) -> None:
        for name, sp in plans.items():
            self._placement[name] = "resident"
            if sp.load_resident is not None:
                size = sp.load_resident(self.device)
            elif _on_device(sp, self.device):
                size = sum(t.numel() * t.element_size() for t in sp.module.state_dict().values())
            else:
                offsets, size = pack(sp.specs)
                arena = torch.empty(size, dtype=torch.uint8, device=self.device)
                views = carve(arena, sp.specs, offsets)
                sp.fill(views)
                assign(sp.module, views)
            self._resident_bytes[name] = size
            self._device_bytes += size

    def _place_region(self, plans: Mapping[str, StagePlan]) -> None:
        size = max(sp.nbytes for sp in plans.values())
        self._region = torch.empty(size, dtype=torch.uint8, device=self.device)
        self._device_bytes += size
        cuda = self.device.type == "cuda"
        for name, sp in plans.items():
            offsets, nbytes = pack(sp.specs)
            views = carve(self._region, sp.specs, offsets)
            if cuda:  # the host copy: the stage's bytes in region layout, pinned for DMA
                host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                sp.fill(carve(host, sp.specs, offsets))
                self._host_bytes += nbytes
                self._swapped[name] = _Swapped(views, nbytes, host=host)
            else:  # the host copy is the files (or the state dict): re-read on entry
                self._swapped[name] = _Swapped(views, nbytes, refill=sp.fill)
            assign(sp.module, views)
            self._placement[name] = "swapped"
            self._resident_bytes[name] = 0

    # ---------------------------------------------------------------- use
    def _enter_region(self, name: str) -> None:
        if self._in_region == name:
            return
        swap = self._swapped[name]
        self._in_region = None  # a failed copy leaves the region's content unknown
        if swap.host is not None:
            self.copier.after_compute()
            dst = self._region[: swap.nbytes]
            self.copier.wait(self.copier.copy(dst, swap.host, chunk=CHUNK_BYTES))
        else:
            start = time.perf_counter()
            with torch.no_grad():
                swap.refill(swap.views)
            self.copier.record_sync(swap.nbytes, time.perf_counter() - start)
        self._in_region = name

    @contextmanager
    def use(self, name: str) -> Iterator[nn.Module]:
        """The stage's module, its weights valid on the device inside the block."""
        if name not in self.modules:
            raise KeyError(
                f"stage {name!r} is not planned; planned stages: {', '.join(self.modules)}"
            )
        if name not in self._swapped:
            yield self.modules[name]
            return
        if self._entered not in (None, name):
            raise RuntimeError(
                f"cannot enter stage {name!r} while {self._entered!r} is in use: in sequential "
                "mode they share one device region"
            )
        outer = self._entered
        self._enter_region(name)
        self._entered = name
        try:
            yield self.modules[name]
        finally:
            self._entered = outer

    # ---------------------------------------------------------------- report
    def report(self) -> dict:
        """Mode and why; peak memory (`peak_kind` says what was measured); device and host bytes
        the weights take; bytes and number of weight copies and their time; streaming misses
        (copies the schedule did not foresee); per stage its bytes, placement, resident bytes.

        Copies replayed inside CUDA graphs are counted (and timed) once, at capture."""
        peak, kind = peak_bytes(self.device)
        return {
            "mode": self.mode,
            "why": self.why,
            "device": str(self.device),
            "peak_bytes": peak,
            "peak_kind": kind,
            "weights_device_bytes": self._device_bytes,
            "host_copy_bytes": self._host_bytes,
            "copied_bytes": self.copier.bytes,
            "copies": self.copier.copies,
            "copy_ms": self.copier.copy_ms(),
            "stream_misses": self._streamer.misses if self._streamer else 0,
            "stages": {
                name: {
                    "bytes": self.stage_bytes[name],
                    "placement": self._placement[name],
                    "resident_bytes": self._resident_bytes[name],
                }
                for name in self.modules
            },
        }
