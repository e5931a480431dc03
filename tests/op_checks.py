"""Helpers shared by the op tests (norm ops fully; attention and vq_lookup use `capture`).

Backends: every registered backend is a test parameter; one that cannot run here is skipped with
the reason. Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET), and the interpreter gets small shapes only.

Tolerance: a backend's max error against a float64 oracle may be at most 2x PyTorch's own max
error at the same precision, where PyTorch's own is the torch reference backend run on the same
(rounded) inputs, its result rounded to that dtype (see `assert_2x`). A floor of a few fp32 ulps
of the output scale covers fp32 cases where the reference happens to round almost exactly.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from cascade_rt import _ext
from cascade_rt.ops import registry

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INTERPRETER_MAX_ELEMS = 1 << 20  # the Triton interpreter is numpy per program: keep it small
GPU = pytest.mark.gpu


def _param(name: str, device: str, available: bool, why: str):
    marks = [pytest.mark.skipif(not available, reason=why)]
    if device == "cuda":
        marks.append(GPU)
    return pytest.param(name, device, marks=marks, id=f"{name}-{device}")


# (backend, device): the CPU set runs everywhere, the CUDA set only with a GPU.
CPU_BACKENDS = [
    _param("torch", "cpu", True, ""),
    _param("cpp", "cpu", _ext.available(), "extension not built"),
    _param("triton", "cpu", HAS_TRITON and not HAS_CUDA, "interpreter runs only without CUDA"),
]
CUDA_BACKENDS = [
    _param("cuda", "cuda", HAS_CUDA and _ext.has_cuda(), "no CUDA device or no CUDA build"),
    _param("triton", "cuda", HAS_CUDA and HAS_TRITON, "no CUDA device or no triton"),
    _param("torch", "cuda", HAS_CUDA, "no CUDA device"),
]
ALL_BACKENDS = CPU_BACKENDS + CUDA_BACKENDS


def require(op: str, backend: str, x: torch.Tensor, **facts: object) -> None:
    """Skips unless `backend` runs `op` on x's device and dtype (and x is small enough for the
    interpreter)."""
    impl = registry.backends(op).get(backend)
    if impl is None:
        pytest.skip(f"{op} has no {backend} backend")
    if not impl.supports(device=x.device, dtype=x.dtype, **facts):
        pytest.skip(f"{backend} cannot run {op} for {x.dtype} on {x.device} {facts}")
    if backend == "triton" and x.device.type == "cpu" and x.numel() > INTERPRETER_MAX_ELEMS:
        pytest.skip(f"{x.numel()} elements is too many for the Triton interpreter")


def poisoned(shape, dtype, device, **kw) -> torch.Tensor:
    """An output buffer full of NaN, so an element the kernel fails to write fails the check."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(**kw)


def _round(own: torch.Tensor, dtype: torch.dtype, truncate: bool) -> torch.Tensor:
    if truncate:  # drop the low 16 bits of the fp32 pattern: bf16 rounded toward zero
        return (own.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)
    return own.to(dtype)


def assert_2x(
    name: str, backend: str, got: torch.Tensor, own: torch.Tensor, ref: torch.Tensor
) -> None:
    """max|got - ref| <= 2 max|own - ref| + a few fp32 ulps of max|ref|.

    ref: the float64 oracle. own: the torch reference's fp32 result (its math is fp32 and it
    rounds only when it writes `out`), rounded here to got's dtype as the backend rounds: to
    nearest even, except the Triton interpreter in bf16, which converts by truncation (triton
    3.9 interpreter._convert_float; compiled Triton rounds to nearest even)."""
    truncate = backend == "triton" and got.device.type == "cpu" and got.dtype == torch.bfloat16
    own = _round(own.detach().cpu(), got.dtype, truncate)
    got, own, ref = (t.detach().cpu().double() for t in (got, own, ref))
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    err = (got - ref).abs().max().item()
    own_err = (own - ref).abs().max().item()
    floor = 8 * torch.finfo(torch.float32).eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * own_err + floor, (
        f"{name}: max error {err:.3g} exceeds 2 x PyTorch's own {own_err:.3g} (+ {floor:.2g})"
    )


def randn(shape, dtype, device, seed: int, scale: float = 1.0, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + offset).to(dtype).to(device)


def capture(step) -> torch.cuda.CUDAGraph:
    """Runs `step` once on a side stream (Triton compiles, kernels load, nothing of that lands in
    the graph), then captures it; the caller replays and compares with eager."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
