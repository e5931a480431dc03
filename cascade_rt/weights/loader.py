"""Loading a checkpoint into a meta-built module: check everything, allocate once, copy, assign.

Order of work (design.md "Weights"): the module's meta state dict gives the canonical names and
shapes; the key map plans which file key fills which rows of which tensor; every key, shape and
dtype is checked against the file headers; only then is one arena allocated on the device, filled
by reading file bytes into its views, and assigned with `load_state_dict(assign=True)`. A failure
at any point leaves the module on meta and drops the arena.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from .arena import Arena
from .keymap import WEIGHT_COMPONENTS, Piece, ignored, plan
from .layout import Source
from .safetensors_io import FLOAT_CODES, INT_CODES, CheckpointError, TensorInfo

RUN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LIST = 10  # names listed per error; the counts are always complete


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST])
    return shown + (f", ... ({len(items) - _LIST} more)" if len(items) > _LIST else "")


def _where(source: Source) -> str:
    if len(source.files) == 1:
        return str(source.files[0])
    return f"{source.folder} ({len(source.files)} shards)"


def _check_module(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """The module is fully on meta and every tensor it owns is in its state dict."""
    if on_device := [k for k, t in expected.items() if not t.is_meta]:
        raise ValueError(
            f"{type(module).__name__} must be built on the meta device; "
            f"{len(on_device)} tensors are not: {_names(on_device)}"
        )
    owned = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    if transient := sorted(owned - expected.keys()):
        # Non-persistent buffers are not in checkpoints, so they would stay on meta.
        raise ValueError(
            f"{type(module).__name__} has non-persistent buffers the loader cannot fill: "
            f"{_names(transient)}; compute them in forward or register them as persistent"
        )


def _check_keys(source: Source, pieces: list[Piece]) -> None:
    needed = {p.file_key for p in pieces}
    missing = sorted(needed - source.tensors.keys())
    unexpected = sorted(
        k for k in source.tensors.keys() - needed if not ignored(source.component, k)
    )
    if missing or unexpected:
        raise CheckpointError(
            f"{_where(source)} ({source.layout} {source.component}) does not "
            f"fit the module: {len(missing)} missing keys [{_names(missing)}], "
            f"{len(unexpected)} unexpected keys [{_names(unexpected)}]"
        )


@dataclass(frozen=True)
class _Job:
    info: TensorInfo
    key: str  # canonical key
    rows: tuple[int, int] | None
    file_dtype: torch.dtype


def _check_tensors(
    source: Source, pieces: list[Piece], expected: dict[str, torch.Tensor], run_dtype: torch.dtype
) -> tuple[list[_Job], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """Every piece's shape and dtype; returns the copy jobs and the arena specs."""
    jobs: list[_Job] = []
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    bad: list[str] = []
    for p in pieces:
        info, meta = source.tensors[p.file_key], expected[p.canonical_key]
        want = p.shape(meta.shape)
        if info.shape != want:
            bad.append(
                f"{info.path.name}: key {p.file_key!r} expected shape {list(want)}, "
                f"found {list(info.shape)}"
            )
            continue
        codes = FLOAT_CODES if meta.is_floating_point() else INT_CODES
        if info.dtype not in codes:
            raise CheckpointError(
                f"{info.path}: key {p.file_key!r} has unsupported dtype {info.dtype} for a "
                f"{meta.dtype} tensor (supported: {', '.join(codes)})"
            )
        jobs.append(_Job(info, p.canonical_key, p.rows, codes[info.dtype]))
        dtype = run_dtype if meta.is_floating_point() else meta.dtype
        specs[p.canonical_key] = (tuple(meta.shape), dtype)
    if bad:
        raise CheckpointError(f"{_where(source)}: {len(bad)} shape mismatches: {_names(bad)}")
    # Arena order follows the module, so views of one block sit together.
    return jobs, {k: specs[k] for k in expected}


def _read_into(f: BinaryIO, info: TensorInfo, dst: memoryview) -> None:
    f.seek(info.start)
    done = 0
    while done < info.nbytes:
        n = f.readinto(dst[done:])
        if not n:
            raise CheckpointError(
                f"{info.path}: key {info.name!r}: file ends {info.nbytes - done} bytes early"
            )
        done += n


def _as_bytes(t: torch.Tensor) -> memoryview:
    """Writable byte view of a contiguous CPU tensor (numpy has no bfloat16, uint8 always works).

    Arena views and their row slices are contiguous, so reshape returns a view, never a copy.
    """
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _copy(arena: Arena, jobs: list[_Job]) -> None:
    """Fills the arena in file order. On CPU, pieces already in the run dtype are read straight
    into their view's bytes; the rest go through one staging buffer (pinned for CUDA, so the
    host-to-device copy is a DMA) and `copy_`, which casts."""
    jobs = sorted(jobs, key=lambda j: (str(j.info.path), j.info.start))

    def dest(j: _Job) -> torch.Tensor:
        view = arena.views[j.key]
        return view if j.rows is None else view[j.rows[0] : j.rows[1]]

    cpu = arena.device.type == "cpu"
    staged = [j for j in jobs if not cpu or j.file_dtype != arena.views[j.key].dtype]
    size = max((j.info.nbytes for j in staged), default=0)
    staging = torch.empty(size, dtype=torch.uint8, pin_memory=arena.device.type == "cuda")
    with ExitStack() as stack:
        files: dict[Path, BinaryIO] = {}
        for j in jobs:
            if j.info.nbytes == 0:
                continue
            if j.info.path not in files:
                files[j.info.path] = stack.enter_context(open(j.info.path, "rb", buffering=0))
            f, out = files[j.info.path], dest(j)
            if cpu and j.file_dtype == out.dtype:
                _read_into(f, j.info, _as_bytes(out))
                continue
            buf = staging[: j.info.nbytes]
            _read_into(f, j.info, _as_bytes(buf))
            out.copy_(buf.view(j.file_dtype).view(out.shape))


def load_module(
    module: nn.Module, source: Source, *, device: torch.device | str, dtype: torch.dtype
) -> nn.Module:
    """Loads `source` into `module` (built on meta) as views of one arena on `device`.

    Float tensors are stored in `dtype`, integer buffers in their own dtype. Sets
    `module.arena_bytes`. Raises CheckpointError (or ValueError for a misbuilt module) before
    allocating anything when a key, shape or dtype does not fit.
    """
    if dtype not in RUN_DTYPES:
        raise ValueError(f"run dtype must be one of {RUN_DTYPES}, got {dtype}")
    if source.component not in WEIGHT_COMPONENTS:
        raise ValueError(f"{source.component} has no weights to load")
    expected = module.state_dict(keep_vars=True)
    _check_module(module, expected)
    shapes = {k: tuple(t.shape) for k, t in expected.items()}
    try:
        pieces = plan(source.component, source.layout, shapes)
    except ValueError as e:
        raise CheckpointError(f"{type(module).__name__}: {e}") from e
    _check_keys(source, pieces)
    jobs, specs = _check_tensors(source, pieces, expected, dtype)

    arena = Arena(specs, device)
    try:
        _copy(arena, jobs)
        module.load_state_dict(arena.views, assign=True, strict=True)
    except BaseException:
        # Put the meta tensors back so no module keeps views of a half-filled arena.
        module.load_state_dict(expected, assign=True, strict=False)
        arena.release()
        raise
    module.arena_bytes = arena.nbytes
    return module
