"""Loading a checkpoint into a meta-built module: check everything, then map or copy, assign.

Order of work (design.md "Weights"): the module's meta state dict gives the canonical names and
shapes; the key map plans which file key fills which rows of which tensor; every key, shape, dtype
and file size is checked against the file headers (`plan_load`, which allocates nothing); only
then is memory taken and filled, and the tensors assigned with `load_state_dict(assign=True)`. A
failure at any point leaves the module on meta and drops what was taken.

Where the weights live:
- CPU: a tensor stored in the file in its run dtype that maps 1:1 onto a canonical tensor is a
  view of the file's copy-on-write mapping (filemap.py): zero copy, the page cache's own pages.
  The rest (dtype casts, q/k/v files fused into `in_proj_*` rows, the rare tensor whose file
  offset is not element-aligned) are cast from the mapping into one pre-faulted arena (arena.py).
- CUDA: one device arena, filled through pinned staging buffers on a copy stream, cast on the
  device (staging.py).

`LoadPlan.fill` writes the same tensors into caller-owned views (a memory planner refilling a
fixed buffer) through the staging buffers of staging.py on either device (pread, then one copy
or cast per tensor), so a refill maps nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arena import Arena, arena_layout, nbytes_of
from .filemap import check_size, map_file, tensor_bytes
from .keymap import WEIGHT_COMPONENTS, Piece, ignored, plan
from .layout import Source
from .safetensors_io import FLOAT_CODES, INT_CODES, CheckpointError, TensorInfo
from .staging import stream_copy

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]

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
) -> tuple[list[_Job], Specs]:
    """Every piece's shape and dtype; returns the copy jobs and the specs of the tensors."""
    jobs: list[_Job] = []
    specs: Specs = {}
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
    # Module order, so arena views of one block sit together.
    return jobs, {k: specs[k] for k in expected}


def _check_sizes(jobs: Sequence[_Job]) -> None:
    """Every tensor's bytes lie inside its file as it is now (headers may be older)."""
    sizes: dict[Path, int] = {}
    for j in jobs:
        if j.info.path not in sizes:
            try:
                sizes[j.info.path] = j.info.path.stat().st_size
            except OSError as e:
                raise CheckpointError(f"{j.info.path}: cannot read: {e}") from e
        check_size(j.info, sizes[j.info.path])


def _destination(views: Mapping[str, torch.Tensor], job: _Job) -> torch.Tensor:
    view = views[job.key]
    return view if job.rows is None else view[job.rows[0] : job.rows[1]]


def _file_view(maps: Mapping[Path, torch.Tensor], job: _Job) -> torch.Tensor:
    """The job's tensor as a typed view of its mapped file; its offset must be element-aligned."""
    raw = tensor_bytes(maps[job.info.path], job.info)
    return raw.view(job.file_dtype).view(job.info.shape)


def _aligned(job: _Job) -> bool:
    return job.info.start % job.file_dtype.itemsize == 0


def _copy_cpu(
    jobs: Sequence[_Job], views: Mapping[str, torch.Tensor], maps: Mapping[Path, torch.Tensor]
) -> None:
    """Copies each job from its file mapping into its view, casting where dtypes differ (one
    multi-threaded `copy_` per tensor, in file order)."""
    for j in sorted(jobs, key=lambda j: (str(j.info.path), j.info.start)):
        out = _destination(views, j)
        if out.dtype == j.file_dtype:
            out.view(-1).view(torch.uint8).copy_(tensor_bytes(maps[j.info.path], j.info))
        elif _aligned(j):
            out.copy_(_file_view(maps, j))
        else:
            # Mixed-dtype files can leave a tensor at an offset its dtype cannot view.
            raw = tensor_bytes(maps[j.info.path], j.info).clone()
            out.copy_(raw.view(j.file_dtype).view(out.shape))


def _write(
    jobs: Sequence[_Job],
    views: Mapping[str, torch.Tensor],
    device: torch.device,
    maps: Mapping[Path, torch.Tensor] | None = None,
) -> None:
    """Fills `views` from the files: from `maps` (the files' mappings) when given, else through
    the staging buffers (`LoadPlan.fill`: mapping a whole file to refill a buffer would put a
    second copy of the stage in the process' RSS while it runs)."""
    if not jobs:
        return
    if maps is not None:
        _copy_cpu(jobs, views, maps)
    else:
        items = [(j.info, j.file_dtype, _destination(views, j).view(-1)) for j in jobs]
        stream_copy(items, device)


@dataclass(frozen=True)
class LoadPlan:
    """Everything checked about loading one checkpoint into one module; nothing allocated.

    specs: {canonical key: (shape, dtype)} in module order, the tensors `fill` writes.
    nbytes: size of an arena holding them all (arena.ALIGNMENT between views).
    """

    module_name: str
    specs: Specs
    jobs: tuple[_Job, ...]

    @property
    def nbytes(self) -> int:
        return arena_layout(self.specs)[1]

    def _check_views(self, views: Mapping[str, torch.Tensor]) -> torch.device:
        if not views and not self.specs:
            return torch.device("cpu")
        missing = sorted(self.specs.keys() - views.keys())
        unexpected = sorted(views.keys() - self.specs.keys())
        if missing or unexpected:
            raise ValueError(
                f"LoadPlan.fill for {self.module_name}: {len(missing)} views missing "
                f"[{_names(missing)}], {len(unexpected)} unexpected [{_names(unexpected)}]"
            )
        bad = [
            f"{k}: {list(v.shape)} {v.dtype}{'' if v.is_contiguous() else ' non-contiguous'}, "
            f"expected {list(shape)} {dtype}"
            for k, v in views.items()
            for shape, dtype in [self.specs[k]]
            if tuple(v.shape) != shape or v.dtype != dtype or not v.is_contiguous()
        ]
        if bad:
            raise ValueError(
                f"LoadPlan.fill for {self.module_name}: {len(bad)} bad views: {_names(bad)}"
            )
        devices = sorted({str(v.device) for v in views.values()})
        if len(devices) > 1 or devices[0].split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(
                f"LoadPlan.fill for {self.module_name}: views must share one CPU or CUDA "
                f"device, got {', '.join(devices)}"
            )
        return next(iter(views.values())).device

    def fill(self, views: Mapping[str, torch.Tensor]) -> None:
        """Writes every tensor into `views` ({key: contiguous tensor of its spec's shape and
        dtype}, all on one CPU or CUDA device), casting from the file dtype. Checks every view
        before writing any."""
        device = self._check_views(views)
        _write(self.jobs, views, device)


def plan_load(module: nn.Module, source: Source, dtype: torch.dtype) -> LoadPlan:
    """Checks that `source` fits `module` (built on meta) in run dtype `dtype`: every key, shape,
    dtype and file size. Raises CheckpointError (ValueError for a misbuilt module or a bad run
    dtype); allocates nothing."""
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
    _check_sizes(jobs)
    return LoadPlan(type(module).__name__, specs, tuple(jobs))


def _zero_copy_jobs(load: LoadPlan) -> dict[str, _Job]:
    """Jobs whose file bytes can be the tensor itself: the whole tensor, in its run dtype, at an
    element-aligned offset."""
    count: dict[str, int] = {}
    for j in load.jobs:
        count[j.key] = count.get(j.key, 0) + 1
    return {
        j.key: j
        for j in load.jobs
        if count[j.key] == 1
        and j.rows is None
        and j.file_dtype == load.specs[j.key][1]
        and _aligned(j)
    }


def load_module(
    module: nn.Module, source: Source, *, device: torch.device | str, dtype: torch.dtype
) -> nn.Module:
    """Loads `source` into `module` (built on meta) on `device`.

    Float tensors are stored in `dtype`, integer buffers in their own dtype. On CPU, tensors the
    file holds as they are needed are views of the mapped file (module.mapped_bytes), the others
    sit in one arena (module.arena_bytes); on CUDA everything is in one arena. The mappings are
    kept on `module._weight_maps`. Raises CheckpointError (or ValueError for a misbuilt module)
    before allocating anything when a key, shape, dtype or file size does not fit.
    """
    load = plan_load(module, source, dtype)
    device = torch.device(device)
    expected = module.state_dict(keep_vars=True)
    arena: Arena | None = None
    try:
        direct: dict[str, torch.Tensor] = {}
        maps: dict[Path, torch.Tensor] | None = None
        kept: tuple[torch.Tensor, ...] = ()
        if device.type == "cpu":
            maps = {p: map_file(p) for p in dict.fromkeys(j.info.path for j in load.jobs)}
            zero_copy = _zero_copy_jobs(load)
            direct = {k: _file_view(maps, j) for k, j in zero_copy.items()}
            # Only mappings that tensors view stay alive; the others go once the copies are done.
            kept = tuple(maps[p] for p in dict.fromkeys(j.info.path for j in zero_copy.values()))
        arena = Arena({k: s for k, s in load.specs.items() if k not in direct}, device)
        _write([j for j in load.jobs if j.key not in direct], arena.views, device, maps)
        module.load_state_dict({**direct, **arena.views}, assign=True, strict=True)
    except BaseException:
        # Put the meta tensors back so no module keeps views of a half-filled arena.
        module.load_state_dict(expected, assign=True, strict=False)
        if arena is not None:
            arena.release()
        raise
    module.arena_bytes = arena.nbytes
    module.mapped_bytes = sum(nbytes_of(*load.specs[k]) for k in direct)
    module._weight_maps = kept
    return module
