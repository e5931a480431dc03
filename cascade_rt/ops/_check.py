"""Shared argument checks for the public ops: every failure names the op and the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    device: torch.device | None = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported: {list(dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the inputs are on {device}")
    if t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty (shape {tuple(t.shape)})")


def check_out(
    op: str,
    out: torch.Tensor | None,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    name: str = "out",
) -> torch.Tensor:
    """Returns `out`, or a new tensor when it is None; checks a given one fully."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {out.dtype}, expected {dtype}")
    if out.device != device:
        raise ValueError(f"{op}: {name} is on {out.device}, expected {device}")
    if not out.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous")
    return out
