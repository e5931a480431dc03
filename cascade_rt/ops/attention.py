"""attention: the cascade's combined self+cross attention, keys/values = [image ; condition]."""

from __future__ import annotations

import torch

from cascade_rt import _ext
from cascade_rt.ops._check import check_out, check_tensor
from cascade_rt.ops._support import cuda_runs, triton_runs
from cascade_rt.ops.reference import attention_torch
from cascade_rt.ops.registry import Impl, register, resolve

OP = "attention"
MAX_HEAD_DIM = 256  # the Triton kernel's limit; CUDA takes up to 128, the models use 64


def _strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, token, head) element strides of a [B, N, H, D] tensor; zeros for an absent one."""
    return (0, 0, 0) if t is None else tuple(t.stride()[:3])


def _cuda_fn(q, k, v, k2, v2, out) -> None:
    b, nq, h, d = q.shape
    with torch.cuda.device(q.device):  # launch on q's device, on its current stream
        _ext.native().attention_cuda(
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            0 if k2 is None else k2.data_ptr(),
            0 if v2 is None else v2.data_ptr(),
            out.data_ptr(),
            b,
            h,
            d,
            nq,
            k.shape[1],
            0 if k2 is None else k2.shape[1],
            _strides(q),
            _strides(k),
            _strides(v),
            _strides(k2),
            _strides(v2),
            _strides(out),
            _ext.DTYPE_TAGS[q.dtype],
            _ext.stream_handle(q.device),
        )


def _triton_fn(q, k, v, k2, v2, out) -> None:
    # Imported on first use: the kernel module is compiled or interpreted Triton depending on
    # TRITON_INTERPRET when it is imported.
    from cascade_rt.kernels.attention import attention_triton

    if q.device.type == "cuda":
        with torch.cuda.device(q.device):  # Triton launches on the current device
            attention_triton(q, k, v, k2, v2, out)
    else:
        attention_triton(q, k, v, k2, v2, out)


def _triton_supports(device: torch.device, head_dim: int = 64, **_: object) -> bool:
    return triton_runs(device) and head_dim <= MAX_HEAD_DIM


def _cuda_supports(device: torch.device, head_dim: int = 64, **_: object) -> bool:
    return (
        cuda_runs(device, "attention_cuda")
        and head_dim <= _ext.native().attention_cuda_max_head_dim
    )


register(OP, Impl("cuda", _cuda_fn, _cuda_supports))
register(OP, Impl("triton", _triton_fn, _triton_supports))
register(OP, Impl("torch", attention_torch, lambda **_: True))


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any batch/token/head strides (slices of a fused qkv projection are read in
    # place) but need the head dim contiguous; only then is a copy made.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k2: torch.Tensor | None = None,
    v2: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)) V with K = [k ; k2], V = [v ; v2] along the token axis.

    q: [B, Nq, H, D]; k, v: [B, Nk, H, D]; k2, v2: [B, Nc, H, D] (optional second source, never
    concatenated in memory by the fused kernels). Any strides with a unit-stride head dim are
    read in place. Returns out [B, Nq, H, D] in q's dtype.
    """
    check_tensor(OP, "q", q, ndim=4)
    b, _, h, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim {d} exceeds the supported maximum {MAX_HEAD_DIM}")
    pairs = [("k", k, "v", v)] + (
        [("k2", k2, "v2", v2)] if k2 is not None or v2 is not None else []
    )
    for kn, kt, vn, vt in pairs:
        if kt is None or vt is None:
            raise ValueError(f"{OP}: {kn} and {vn} must be given together")
        for name, t in ((kn, kt), (vn, vt)):
            check_tensor(OP, name, t, ndim=4, dtypes=(q.dtype,), device=q.device)
            if t.shape[0] != b or t.shape[2] != h or t.shape[3] != d:
                raise ValueError(
                    f"{OP}: {name} has shape {tuple(t.shape)}; "
                    f"expected [{b}, N, {h}, {d}] to match q"
                )
        if kt.shape[1] != vt.shape[1]:
            raise ValueError(f"{OP}: {kn} has {kt.shape[1]} tokens but {vn} has {vt.shape[1]}")
    out = check_out(OP, out, tuple(q.shape), q.dtype, q.device)
    impl = resolve(OP, backend, device=q.device, dtype=q.dtype, head_dim=d)
    k2, v2 = (None, None) if k2 is None else (_unit_last(k2), _unit_last(v2))
    impl.fn(_unit_last(q), _unit_last(k), _unit_last(v), k2, v2, out)
    return out
