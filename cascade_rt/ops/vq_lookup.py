"""vq_lookup: nearest codeword (L2) -> indices and quantized vectors (Stage A's encoder)."""

from __future__ import annotations

import torch

from cascade_rt import _ext
from cascade_rt.ops._check import check_out, check_tensor
from cascade_rt.ops._support import cpp_runs, cuda_runs, triton_runs
from cascade_rt.ops.reference import vq_lookup_torch
from cascade_rt.ops.registry import Impl, register, resolve

OP = "vq_lookup"
MAX_TRITON_DIM = 64


def _native_args(x: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor, q: torch.Tensor):
    n, d = x.shape
    return (
        x.data_ptr(),
        codebook.data_ptr(),
        idx.data_ptr(),
        q.data_ptr(),
        n,
        codebook.shape[0],
        d,
        _ext.DTYPE_TAGS[x.dtype],
    )


def _cpp_fn(x, codebook, indices, quantized) -> None:
    _ext.native().vq_lookup_cpu(*_native_args(x, codebook, indices, quantized))


def _cuda_fn(x, codebook, indices, quantized) -> None:
    _ext.native().vq_lookup_cuda(
        *_native_args(x, codebook, indices, quantized), _ext.stream_handle(x.device)
    )


def _triton_fn(x, codebook, indices, quantized) -> None:
    # Imported on first use: the kernel module decides between compiled and interpreted Triton
    # when it is imported, from TRITON_INTERPRET.
    from cascade_rt.kernels.vq_lookup import vq_lookup_triton

    vq_lookup_triton(x, codebook, indices, quantized)


def _triton_supports(device: torch.device, dim: int = 4, **_: object) -> bool:
    # The kernel unrolls the width; wider codebooks take another backend.
    return triton_runs(device) and dim <= MAX_TRITON_DIM


def _cpp_supports(device: torch.device, dim: int = 4, **_: object) -> bool:
    return cpp_runs(device, "vq_lookup_cpu") and dim <= _ext.native().vq_max_dim


def _cuda_supports(device: torch.device, dim: int = 4, **_: object) -> bool:
    return cuda_runs(device, "vq_lookup_cuda") and dim <= _ext.native().vq_max_dim


register(OP, Impl("cuda", _cuda_fn, _cuda_supports))
register(OP, Impl("triton", _triton_fn, _triton_supports))
register(OP, Impl("cpp", _cpp_fn, _cpp_supports))
register(OP, Impl("torch", vq_lookup_torch, lambda **_: True))


def vq_lookup(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of each row of `x` by squared L2 distance (ties: lowest index).

    x: [N, D]; codebook: [K, D] (same dtype and device). Returns (indices [N] int64,
    quantized [N, D] = codebook[indices]). `out` = (indices, quantized) to write into.
    """
    check_tensor(OP, "x", x, ndim=2)
    check_tensor(OP, "codebook", codebook, ndim=2, dtypes=(x.dtype,), device=x.device)
    if codebook.shape[1] != x.shape[1]:
        raise ValueError(
            f"{OP}: codebook width {codebook.shape[1]} does not match x width {x.shape[1]}"
        )
    n, d = x.shape
    idx_out, q_out = out if out is not None else (None, None)
    indices = check_out(OP, idx_out, (n,), torch.int64, x.device, name="out[0] (indices)")
    quantized = check_out(OP, q_out, (n, d), x.dtype, x.device, name="out[1] (quantized)")
    impl = resolve(OP, backend, device=x.device, dtype=x.dtype, dim=d)
    impl.fn(x.contiguous(), codebook.contiguous(), indices, quantized)
    return indices, quantized
