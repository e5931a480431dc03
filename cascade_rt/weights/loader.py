"""Loading a checkpoint into a meta-built module: check everything, allocate once, copy, assign.

Order of work (design.md "Weights"): the module's meta state dict gives the canonical names and
shapes; the key map plans which file key fills which rows of which tensor; every key, shape and
dtype is checked against the file headers; only then is one arena allocated on the device, filled
by reading file bytes into its views, and assigned with `load_state_dict(assign=True)`. A failure
at any point leaves the module on meta and drops the arena.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .arena import Arena
from .keymap import Piece, plan
from .layout import Source
from .safetensors_io import FLOAT_CODES, INT_CODES, CheckpointError, TensorInfo

RUN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LIST = 10  # names listed per error; the counts are always complete


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST])
    return shown + (f", ... ({len(items) - _LIST} more)" if len(items) > _LIST else "")


def _files(source: Source) -> str:
    return source.files[0].name if len(source.files) == 1 else f"{len(source.files)} shards"


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
    unexpected = sorted(source.tensors.keys() - needed)
    if missing or unexpected:
        raise CheckpointError(
            f"{source.folder / _files(source)} ({source.layout} {source.component}) does not "
            f"fit the module: {len(missing)} missing keys [{_names(missing)}], "
            f"{len(unexpected)} unexpected keys [{_names(unexpected)}]"
        )


def _dest_dtype(info: TensorInfo, meta: torch.Tensor, run_dtype: torch.dtype) -> torch.dtype:
    """Float tensors load as the run dtype from F32/F16/BF16; integer buffers keep their dtype."""
    codes = FLOAT_CODES if meta.is_floating_point() else INT_CODES
    if info.dtype not in codes:
        raise CheckpointError(
            f"{info.path}: key {info.name!r} has unsupported dtype {info.dtype} for a "
            f"{meta.dtype} tensor (supported: {', '.join(codes)})"
        )
    return run_dtype if meta.is_floating_point() else meta.dtype


def _read_into(f, info: TensorInfo, dst: memoryview) -> None:
    f.seek(info.start)
    done = 0
    while done < info.nbytes:
        n = f.readinto(dst[done:])
        if not n:
            raise CheckpointError(
                f"{info.path}: key {info.name!r}: file ends {info.nbytes - done} bytes early"
            )
        done += n


def _copy(arena: Arena, source: Source, pieces: list[Piece], dtypes: dict[str, torch.dtype]):
    """Fills the arena. Same-dtype pieces on CPU are read straight into their view's bytes;
    others go through one staging buffer (pinned for CUDA) and `copy_`, which casts."""
    jobs = sorted(pieces, key=lambda p: (str(source.tensors[p.file_key].path), source.tensors[p.file_key].start))
    direct = arena.device.type == "cpu"
    staged = [p for p in jobs if not direct or FLOAT_CODES.get(source.tensors[p.file_key].dtype, INT_CODES.get(source.tensors[p.file_key].dtype)) != dtypes[p.canonical_key]]
    size = max((source.tensors[p.file_key].nbytes for p in staged), default=0)
    staging = torch.empty(size, dtype=torch.uint8, pin_memory=arena.device.type == "cuda")
    handles: dict[str, object] = {}
    try:
        for p in jobs:
            info = source.tensors[p.file_key]
            f = handles.get(str(info.path)) or handles.setdefault(str(info.path), open(info.path, "rb", buffering=0))
            view = arena.views[p.canonical_key]
            if p.rows is not None:
                view = view[p.rows[0] : p.rows[1]]
            if info.nbytes == 0:
                continue
            if p not in staged:
                _read_into(f, info, memoryview(view.view(-1).view(torch.uint8).numpy()).cast("B"))
                continue
            buf = staging[: info.nbytes]
            _read_into(f, info, memoryview(buf.numpy()))
            code = info.dtype
            src = buf.view(FLOAT_CODES.get(code) or INT_CODES[code]).view(view.shape)
            view.copy_(src)
    finally:
        for f in handles.values():
            f.close()
