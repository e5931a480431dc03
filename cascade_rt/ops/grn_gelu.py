"""grn_gelu: GlobalResponseNorm(GELU(h)) between the two channel-MLP GEMMs of a ResBlock."""

from __future__ import annotations

import torch

from cascade_rt.ops._check import check_out, check_tensor
from cascade_rt.ops.reference import grn_gelu_torch
from cascade_rt.ops.registry import Impl, register, resolve

OP = "grn_gelu"

register(OP, Impl("torch", grn_gelu_torch, lambda **_: True))


def grn_gelu(
    h: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = gamma * (g * N) + beta + g with g = GELU(h), N = |g|_HW / (mean_C |g|_HW + 1e-6).

    h: [B, H, W, C] channels-last; gamma, beta: [C] (any shape with C elements).
    """
    check_tensor(OP, "h", h, ndim=4)
    c = h.shape[-1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        check_tensor(OP, name, p, device=h.device)
        if p.numel() != c:
            raise ValueError(f"{OP}: {name} has {p.numel()} elements, expected C={c}")
    out = check_out(OP, out, tuple(h.shape), h.dtype, h.device)
    impl = resolve(OP, backend, device=h.device, dtype=h.dtype, channels=c)
    impl.fn(h, gamma.reshape(c), beta.reshape(c), out)
    return out
