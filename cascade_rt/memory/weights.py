"""Where a stage's bytes come from, and how they are laid out in a buffer the planner owns.

A stage's weights come either from checkpoint files (a `Source` and a run dtype) or from an
in-memory state dict (random-weight cascades, tests). Both are described by a `StagePlan`: the
ordered specs {canonical key: (shape, dtype)} and a `fill(views)` that writes every tensor into
the given views (all on the CPU or all on one CUDA device). `pack` and `carve` lay specs out in
a byte buffer the way `weights.Arena` does (aligned offsets, module order), so one buffer can be
shared by several stages (sequential mode's region) or hold one streamed unit (a slot).

Files are checked by the loader's `plan_load` and written by its `LoadPlan.fill` (which reads
through small staging buffers, so refilling a region never maps a second copy of the stage).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from cascade_rt.weights import CheckpointError, Source
from cascade_rt.weights.arena import ALIGNMENT
from cascade_rt.weights.loader import RUN_DTYPES, load_module, plan_load

Spec = tuple[tuple[int, ...], torch.dtype]
_LIST = 8  # names listed per error message; counts are always complete


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST])
    return shown + (f", ... ({len(items) - _LIST} more)" if len(items) > _LIST else "")


@dataclass(frozen=True, eq=False)
class StageWeights:
    """One stage: its module and where its weights come from.

    Give `source` + `dtype` (checkpoint files; the module must be built on the meta device) or
    `state_dict` (canonical keys, tensors already in the run dtype). With a state dict the
    planner keeps those tensors as the stage's host copy on the CPU; on CUDA it copies them into
    pinned memory and keeps no reference, so a caller that drops its own frees them.
    """

    module: nn.Module
    source: Source | None = None
    dtype: torch.dtype | None = None
    state_dict: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.source is None) == (self.state_dict is None):
            raise ValueError("StageWeights needs exactly one of source (with dtype) or state_dict")
        if self.source is not None and self.dtype not in RUN_DTYPES:
            raise ValueError(f"StageWeights: dtype must be one of {RUN_DTYPES}, got {self.dtype}")

    @classmethod
    def from_module(cls, module: nn.Module) -> StageWeights:
        """A module whose weights are already loaded (e.g. `build_random_models`): its current
        tensors become the host copy, and the planner re-points the module at its own buffers."""
        return cls(module=module, state_dict=dict(module.state_dict()))


def nbytes(spec: Spec) -> int:
    shape, dtype = spec
    numel = 1
    for d in shape:
        numel *= d
    return numel * dtype.itemsize


def pack(
    specs: Mapping[str, Spec], names: Sequence[str] | None = None
) -> tuple[dict[str, int], int]:
    """Aligned byte offsets of `names` (default: all specs, in order) and the total size."""
    offsets: dict[str, int] = {}
    end = 0
    for name in specs if names is None else names:
        start = -(-end // ALIGNMENT) * ALIGNMENT
        offsets[name] = start
        end = start + nbytes(specs[name])
    return offsets, end


def carve(
    buffer: torch.Tensor, specs: Mapping[str, Spec], offsets: Mapping[str, int], base: int = 0
) -> dict[str, torch.Tensor]:
    """Typed views into the uint8 `buffer`, tensor `name` at byte `base + offsets[name]`."""
    views = {}
    for name, start in offsets.items():
        shape, dtype = specs[name]
        raw = buffer[base + start : base + start + nbytes(specs[name])]
        views[name] = raw.view(dtype).view(shape)
    return views


def assign(module: nn.Module, views: Mapping[str, torch.Tensor]) -> None:
    """Points every parameter and buffer of `module` at its view (no copy)."""
    module.load_state_dict(dict(views), assign=True, strict=True)


@dataclass(frozen=True, eq=False)
class StagePlan:
    """A checked stage: its ordered specs, packed size, and how to write its bytes."""

    name: str
    module: nn.Module
    specs: dict[str, Spec]
    fill: Callable[[Mapping[str, torch.Tensor]], None]  # writes every tensor into the views
    file_backed: bool
    # Files only: the loader's own resident load (zero-copy file views on the CPU); returns bytes.
    load_resident: Callable[[torch.device], int] | None = None

    @property
    def nbytes(self) -> int:
        return pack(self.specs)[1]


def _plan_file(name: str, module: nn.Module, source: Source, dtype: torch.dtype) -> StagePlan:
    try:
        load = plan_load(module, source, dtype)
    except (CheckpointError, ValueError) as e:
        raise type(e)(f"stage {name!r}: {e}") from e

    def load_resident(device: torch.device) -> int:
        load_module(module, source, device=device, dtype=dtype)
        return getattr(module, "arena_bytes", 0) + getattr(module, "mapped_bytes", 0)

    return StagePlan(name, module, dict(load.specs), load.fill, True, load_resident)


def _plan_state_dict(
    name: str, module: nn.Module, tensors: Mapping[str, torch.Tensor]
) -> StagePlan:
    expected = module.state_dict(keep_vars=True)
    owned = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    if transient := sorted(owned - expected.keys()):
        raise ValueError(
            f"stage {name!r}: {type(module).__name__} has non-persistent buffers the planner "
            f"cannot place: {_names(transient)}"
        )
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"stage {name!r}: state dict does not fit {type(module).__name__}: "
            f"{len(missing)} missing keys [{_names(missing)}], "
            f"{len(unexpected)} unexpected keys [{_names(unexpected)}]"
        )
    bad = [
        f"{k}: expected {list(t.shape)}, found {list(tensors[k].shape)}"
        for k, t in expected.items()
        if tuple(tensors[k].shape) != tuple(t.shape)
    ]
    if bad:
        raise ValueError(f"stage {name!r}: {len(bad)} shape mismatches: {_names(bad)}")
    specs = {k: (tuple(t.shape), tensors[k].dtype) for k, t in expected.items()}

    @torch.no_grad()
    def fill(views: Mapping[str, torch.Tensor]) -> None:
        for k, view in views.items():
            view.copy_(tensors[k])

    return StagePlan(name, module, specs, fill, file_backed=False)


def plan_stage(name: str, stage: StageWeights) -> StagePlan:
    """Checks `stage` (keys, shapes, dtypes; headers only for files) without allocating."""
    if stage.source is not None:
        return _plan_file(name, stage.module, stage.source, stage.dtype)
    return _plan_state_dict(name, stage.module, stage.state_dict)
