"""grn_gelu: GlobalResponseNorm(GELU(h)) between the two channel-MLP GEMMs of a ResBlock, and its
folded form (PERFORMANCE.md §4.3): GRN as a per-sample channel scale plus a bias of the next GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cascade_rt import _ext
from cascade_rt.ops._check import check_out, check_tensor
from cascade_rt.ops._support import cpp_runs, cuda_runs, ptr, triton_runs
from cascade_rt.ops.reference import grn_gelu_torch
from cascade_rt.ops.registry import Impl, register, resolve

OP = "grn_gelu"
_TILE_PIXELS = 32  # fewest pixels per partial sum of the CUDA/Triton stats pass
_MAX_TILES = 128  # caps the partial-sum workspace at [B, 128, C] fp32


def _workspace(h: torch.Tensor, scale: torch.Tensor | None):
    """(scale [B, C] fp32, partial [B, tiles, C] fp32) for the CUDA and Triton kernels."""
    b, height, width, c = h.shape
    tiles = min((height * width + _TILE_PIXELS - 1) // _TILE_PIXELS, _MAX_TILES)
    partial = torch.empty((b, tiles, c), dtype=torch.float32, device=h.device)
    if scale is None:
        scale = torch.empty((b, c), dtype=torch.float32, device=h.device)
    return scale, partial


def _cuda_fn(h, gamma, beta, out, scale=None) -> None:
    scale, partial = _workspace(h, scale)
    b, height, width, c = h.shape
    _ext.native().grn_gelu_cuda(
        ptr(h),
        ptr(gamma),
        ptr(beta),
        ptr(out),
        ptr(scale),
        ptr(partial),
        b,
        height * width,
        c,
        partial.shape[1],
        _ext.DTYPE_TAGS[h.dtype],
        _ext.stream_handle(h.device),
    )


def _triton_fn(h, gamma, beta, out, scale=None) -> None:
    # Imported on first use: the kernel module picks compiled or interpreted Triton on import.
    from cascade_rt.kernels.grn_gelu import grn_gelu_triton

    grn_gelu_triton(h, gamma, beta, out, *_workspace(h, scale))


def _cpp_fn(h, gamma, beta, out, scale=None) -> None:
    b, height, width, c = h.shape
    if scale is None:
        scale = torch.empty((b, c), dtype=torch.float32)
    _ext.native().grn_gelu_cpu(
        ptr(h),
        ptr(gamma),
        ptr(beta),
        ptr(out),
        ptr(scale),
        b,
        height * width,
        c,
        _ext.DTYPE_TAGS[h.dtype],
    )


register(OP, Impl("cuda", _cuda_fn, lambda device, **_: cuda_runs(device, "grn_gelu_cuda")))
register(OP, Impl("triton", _triton_fn, lambda device, **_: triton_runs(device)))
register(OP, Impl("cpp", _cpp_fn, lambda device, **_: cpp_runs(device, "grn_gelu_cpu")))
register(OP, Impl("torch", grn_gelu_torch, lambda **_: True))


def _check_inputs(h: torch.Tensor, params: dict[str, torch.Tensor]) -> int:
    check_tensor(OP, "h", h, ndim=4)
    c = h.shape[-1]
    for name, p in params.items():
        check_tensor(OP, name, p, dtypes=(h.dtype,), device=h.device)
        if p.numel() != c:
            raise ValueError(f"{OP}: {name} has {p.numel()} elements, expected C={c}")
    return c


def grn_gelu(
    h: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = gamma * (g * N) + beta + g with g = GELU(h), N = |g|_HW / (mean_C |g|_HW + 1e-6).

    h: [B, H, W, C] channels-last; gamma, beta: [C] (any shape with C elements), h's dtype.
    Norms and the mean are fp32.
    """
    c = _check_inputs(h, {"gamma": gamma, "beta": beta})
    h = h.contiguous()
    out = check_out(OP, out, tuple(h.shape), h.dtype, h.device)
    impl = resolve(OP, backend, device=h.device, dtype=h.dtype, channels=c)
    impl.fn(h, gamma.reshape(c).contiguous(), beta.reshape(c).contiguous(), out)
    return out


def grn_gelu_folded(
    h: torch.Tensor,
    gamma: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRN(GELU(h)) split into (g, scale): g = GELU(h) [B, H, W, C] in h's dtype and
    scale = 1 + gamma * N [B, C] fp32, so that grn_gelu(h, gamma, beta) = g * scale + beta.

    One pass over h (the statistics ride along with writing g); the scale and beta then fold
    into the next Linear, see `grn_folded_linear`.
    """
    c = _check_inputs(h, {"gamma": gamma})
    h = h.contiguous()
    out = check_out(OP, out, tuple(h.shape), h.dtype, h.device)
    scale_out = check_out(OP, scale_out, (h.shape[0], c), torch.float32, h.device, name="scale_out")
    impl = resolve(OP, backend, device=h.device, dtype=h.dtype, channels=c)
    impl.fn(h, gamma.reshape(c).contiguous(), None, out, scale_out)
    return out, scale_out


def grn_folded_linear(
    g: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    folded_bias: torch.Tensor,
) -> torch.Tensor:
    """Linear(GRN output) from the folded form: (g * scale) @ weight.T + folded_bias.

    g: [B, H, W, C] from `grn_gelu_folded`; scale: [B, C] fp32; weight: [C_out, C];
    folded_bias: [C_out] = weight @ beta + bias (a load-time constant, `fold_grn_bias`).
    The per-sample scale goes into a per-sample copy of the weight ([B, C_out, C], cheap when
    C_out * C is small next to H * W * C), so g is read once, by the GEMM.
    """
    b, height, width, c = g.shape
    w = (weight.unsqueeze(0) * scale.unsqueeze(1)).to(g.dtype)  # [B, C_out, C]
    y = torch.baddbmm(folded_bias.to(g.dtype), g.view(b, height * width, c), w.transpose(1, 2))
    return y.view(b, height, width, weight.shape[0])


def fold_grn_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, beta: torch.Tensor
) -> torch.Tensor:
    """weight @ beta + bias: GRN's beta carried through the next Linear ([C_out])."""
    return F.linear(beta.reshape(1, -1).to(weight.dtype), weight, bias).reshape(-1)
