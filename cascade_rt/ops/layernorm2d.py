"""layernorm2d: LayerNorm over channels (no affine) on channels-last activations."""

from __future__ import annotations

import torch

from cascade_rt.ops._check import check_out, check_tensor
from cascade_rt.ops.reference import layernorm2d_torch
from cascade_rt.ops.registry import Impl, register, resolve

OP = "layernorm2d"

register(OP, Impl("torch", layernorm2d_torch, lambda **_: True))


def layernorm2d(
    x: torch.Tensor,
    *,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim of x [..., C] (channels-last), no affine."""
    check_tensor(OP, "x", x)
    out = check_out(OP, out, tuple(x.shape), x.dtype, x.device)
    impl = resolve(OP, backend, device=x.device, dtype=x.dtype, channels=x.shape[-1])
    impl.fn(x, out, eps)
    return out
