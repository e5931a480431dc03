"""groupnorm_silu: SiLU(GroupNorm(x)) with a per-channel affine, fused, NCHW or channels-last.

Not used by the cascade (it has no GroupNorm); the ResNet blocks of SD-style UNets and VAEs are
built on it, and users benchmark it against their own stacks.
"""

from __future__ import annotations

import torch

from cascade_rt import _ext
from cascade_rt.ops._check import check_tensor
from cascade_rt.ops._support import cpp_runs, cuda_runs, ptr, triton_runs
from cascade_rt.ops.reference import groupnorm_silu_torch
from cascade_rt.ops.registry import Impl, register, resolve

OP = "groupnorm_silu"
_TILE_ELEMS = 4096  # elements of a group per stats/apply block of the CUDA and Triton kernels


def _channels_last(x: torch.Tensor) -> bool:
    """The layout the kernels read x in (and write out in): channels-last when x is laid out so,
    NCHW otherwise (a tensor that is both, e.g. 1x1 spatial, reads the same either way)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _tiles(x: torch.Tensor, num_groups: int) -> int:
    _, c, h, w = x.shape
    per_group = c // num_groups * h * w
    return max(1, min((per_group + _TILE_ELEMS - 1) // _TILE_ELEMS, h * w, 65535))


def _workspace(x: torch.Tensor, num_groups: int, tiles: int) -> torch.Tensor:
    n = x.shape[0] * num_groups * (3 * tiles + 2)
    return torch.empty(n, dtype=torch.float32, device=x.device)


def _cuda_fn(x, weight, bias, out, num_groups, eps) -> None:
    b, c, h, w = x.shape
    tiles = _tiles(x, num_groups)
    workspace = _workspace(x, num_groups, tiles)  # held until the launches are queued
    _ext.native().groupnorm_silu_cuda(
        ptr(x),
        ptr(weight),
        ptr(bias),
        ptr(out),
        ptr(workspace),
        b,
        c,
        h * w,
        num_groups,
        tiles,
        _channels_last(x),
        eps,
        _ext.DTYPE_TAGS[x.dtype],
        _ext.stream_handle(x.device),
    )


def _triton_fn(x, weight, bias, out, num_groups, eps) -> None:
    # Imported on first use: the kernel module picks compiled or interpreted Triton on import.
    from cascade_rt.kernels.groupnorm_silu import groupnorm_silu_triton

    tiles = _tiles(x, num_groups)
    groupnorm_silu_triton(
        x,
        weight,
        bias,
        out,
        _workspace(x, num_groups, tiles),
        num_groups,
        tiles,
        _channels_last(x),
        eps,
    )


def _cpp_fn(x, weight, bias, out, num_groups, eps) -> None:
    b, c, h, w = x.shape
    _ext.native().groupnorm_silu_cpu(
        ptr(x),
        ptr(weight),
        ptr(bias),
        ptr(out),
        b,
        c,
        h * w,
        num_groups,
        _channels_last(x),
        eps,
        _ext.DTYPE_TAGS[x.dtype],
    )


register(OP, Impl("cuda", _cuda_fn, lambda device, **_: cuda_runs(device, "groupnorm_silu_cuda")))
register(OP, Impl("triton", _triton_fn, lambda device, **_: triton_runs(device)))
register(OP, Impl("cpp", _cpp_fn, lambda device, **_: cpp_runs(device, "groupnorm_silu_cpu")))
register(OP, Impl("torch", groupnorm_silu_torch, lambda **_: True))


def groupnorm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    eps: float = 1e-5,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """silu(group_norm(x, num_groups, weight, bias, eps)) in one fused op (F.group_norm's order).

    x: [B, C, H, W], NCHW or channels-last (a tensor in neither is copied to NCHW first);
    weight, bias: [C] in x's dtype; `num_groups` divides C. The output has x's memory format
    (an `out` given must too). Statistics are fp32 (Welford / two-pass with Chan merges).
    """
    check_tensor(OP, "x", x, ndim=4)
    c = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"{OP}: num_groups={num_groups!r} must be a positive divisor of C={c}")
    for name, p in (("weight", weight), ("bias", bias)):
        check_tensor(OP, name, p, dtypes=(x.dtype,), device=x.device)
        if p.numel() != c:
            raise ValueError(f"{OP}: {name} has {p.numel()} elements, expected C={c}")
    if not (x.is_contiguous() or _channels_last(x)):
        x = x.contiguous()
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=fmt)
    else:
        if tuple(out.shape) != tuple(x.shape):
            raise ValueError(f"{OP}: out has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
        if out.dtype != x.dtype or out.device != x.device:
            raise TypeError(
                f"{OP}: out is {out.dtype} on {out.device}, expected {x.dtype} on {x.device}"
            )
        if not out.is_contiguous(memory_format=fmt):
            raise ValueError(f"{OP}: out must be contiguous in x's memory format ({fmt})")
    impl = resolve(OP, backend, device=x.device, dtype=x.dtype, channels=c)
    impl.fn(x, weight.reshape(c).contiguous(), bias.reshape(c).contiguous(), out, num_groups, eps)
    return out
