"""layernorm2d: LayerNorm over channels (no affine) on channels-last activations, fused with the
neighbours it has in the blocks: a residual add, TimestepBlock modulation, Stage A's scalar gains.
"""

from __future__ import annotations

import torch

from cascade_rt import _ext
from cascade_rt.ops._check import check_out, check_tensor
from cascade_rt.ops._support import cpp_runs, cuda_runs, ptr, triton_runs
from cascade_rt.ops.reference import layernorm2d_torch
from cascade_rt.ops.registry import Impl, register, resolve

OP = "layernorm2d"
MAX_TRITON_C = 16384  # kernels/layernorm2d.py keeps a row in registers


def _native_args(x, out, eps, residual, scale, shift, post_scale, post_shift, pre) -> tuple:
    c = x.shape[-1]
    rows = x.numel() // c
    rows_per_sample = rows // x.shape[0] if x.dim() > 1 else rows
    mod_stride = scale.stride(0) if scale is not None and scale.shape[0] > 1 else 0
    return (
        ptr(x),
        ptr(residual),
        ptr(scale),
        ptr(shift),
        mod_stride,
        ptr(post_scale),
        ptr(post_shift),
        ptr(out),
        ptr(pre),
        rows,
        rows_per_sample,
        c,
        eps,
        _ext.DTYPE_TAGS[x.dtype],
    )


def _cuda_fn(x, out, eps, *fused) -> None:
    _ext.native().layernorm2d_cuda(*_native_args(x, out, eps, *fused), _ext.stream_handle(x.device))


def _cpp_fn(x, out, eps, *fused) -> None:
    _ext.native().layernorm2d_cpu(*_native_args(x, out, eps, *fused))


def _triton_fn(x, out, eps, *fused) -> None:
    # Imported on first use: the kernel module picks compiled or interpreted Triton on import.
    from cascade_rt.kernels.layernorm2d import layernorm2d_triton

    layernorm2d_triton(x, out, eps, *fused)


def _cuda_supports(device: torch.device, channels: int = 1, **_: object) -> bool:
    return cuda_runs(device, "layernorm2d_cuda") and channels <= _ext.native().layernorm2d_max_c


def _triton_supports(device: torch.device, channels: int = 1, **_: object) -> bool:
    return triton_runs(device) and channels <= MAX_TRITON_C


def _cpp_supports(device: torch.device, **_: object) -> bool:
    return cpp_runs(device, "layernorm2d_cpu")


register(OP, Impl("cuda", _cuda_fn, _cuda_supports))
register(OP, Impl("triton", _triton_fn, _triton_supports))
register(OP, Impl("cpp", _cpp_fn, _cpp_supports))
register(OP, Impl("torch", layernorm2d_torch, lambda **_: True))


def layernorm2d(
    x: torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
    post_shift: torch.Tensor | None = None,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    pre_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of x [..., C] (channels-last), no affine, in one pass:

        m   = x + residual                         if residual is given   (like x)
        m   = m * (1 + scale[b]) + shift[b]        if scale, shift given  ([B, C] or [1, C])
        out = LN(m)                                mean/biased variance over C, eps
        out = out * (1 + post_scale) + post_shift  if post_scale, post_shift given (1 element)

    The plain call `layernorm2d(x)` returns `out`. With `residual` or `scale`/`shift` it
    returns `(out, pre)`, where pre = m is the residual stream the next block adds to (written
    into `pre_out` when given). `scale`/`shift` are TimestepBlock's (a, b), indexed by the
    sample (first dim of x; a [1, C] row serves every sample) and may be row views such as
    `ab.chunk(2, dim=1)`; `post_scale`/`post_shift` are Stage A's scalar gammas (0-dim or
    1-element tensors on x's device, read on the device: no host sync). Every tensor shares
    x's dtype and device. Statistics are fp32; the normalisation uses m in fp32 (before `pre`
    is rounded to x's dtype).

    Typical uses: ResBlock `layernorm2d(dw)`; ResBlock output + TimestepBlock + AttnBlock norm
    `tokens, x = layernorm2d(h, residual=x, scale=a, shift=b)`; Stage A
    `layernorm2d(x, post_scale=g[0], post_shift=g[1])`.
    """
    check_tensor(OP, "x", x)
    c = x.shape[-1]
    shape = tuple(x.shape)
    if residual is not None:
        check_tensor(OP, "residual", residual, dtypes=(x.dtype,), device=x.device)
        if tuple(residual.shape) != shape:
            raise ValueError(f"{OP}: residual has shape {tuple(residual.shape)}, expected {shape}")
        residual = residual.contiguous()
    if (scale is None) != (shift is None):
        raise ValueError(f"{OP}: scale and shift must be given together")
    if scale is not None:
        if x.dim() < 2:
            raise ValueError(f"{OP}: scale/shift need x [B, ..., C], got shape {shape}")
        for name, t in (("scale", scale), ("shift", shift)):
            check_tensor(OP, name, t, ndim=2, dtypes=(x.dtype,), device=x.device)
            if t.shape[1] != c or t.shape[0] not in (1, x.shape[0]):
                raise ValueError(
                    f"{OP}: {name} has shape {tuple(t.shape)}; expected [{x.shape[0]}, {c}] "
                    f"or [1, {c}]"
                )
        if scale.shape != shift.shape:
            raise ValueError(f"{OP}: scale {tuple(scale.shape)} and shift {tuple(shift.shape)}")
        # The kernels take one row stride for both and unit stride along C.
        if scale.stride(1) != 1 or shift.stride(1) != 1 or scale.stride(0) != shift.stride(0):
            scale, shift = scale.contiguous(), shift.contiguous()
    if (post_scale is None) != (post_shift is None):
        raise ValueError(f"{OP}: post_scale and post_shift must be given together")
    if post_scale is not None:
        for name, t in (("post_scale", post_scale), ("post_shift", post_shift)):
            check_tensor(OP, name, t, dtypes=(x.dtype,), device=x.device)
            if t.numel() != 1:
                raise ValueError(f"{OP}: {name} must have one element, got {tuple(t.shape)}")
    fused = residual is not None or scale is not None
    if pre_out is not None and not fused:
        raise ValueError(f"{OP}: pre_out is only written with residual or scale/shift")
    x = x.contiguous()
    out = check_out(OP, out, shape, x.dtype, x.device)
    pre = check_out(OP, pre_out, shape, x.dtype, x.device, name="pre_out") if fused else None
    impl = resolve(OP, backend, device=x.device, dtype=x.dtype, channels=c)
    impl.fn(x, out, eps, residual, scale, shift, post_scale, post_shift, pre)
    return (out, pre) if fused else out
