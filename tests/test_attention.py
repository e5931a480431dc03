"""attention: every available backend against a float64 reference.

Tolerance rule (flash-attention's): a backend's max abs error against float64 may be at most twice
PyTorch's own error at the same precision (torch SDPA run in that dtype on the concatenated
keys/values), plus half an ulp of the largest output, which is what rounding the exact result to
the output dtype alone can cost (it keeps cases where SDPA happens to be exact, such as a single
key, from demanding bit-exactness). On CPU, torch's SDPA keeps the probabilities P in fp32, while
the fused kernels round P to the input dtype for the P·V product as GPU flash attention does; in
bf16 with only a few keys that rounding is as large as the output's own, and the Triton error sits
at 0.8-0.96 of this bound (the floor included; over 40 seeds of the small shapes).

On a CPU-only machine the Triton kernel runs in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET before triton is first imported).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from op_checks import capture

from cascade_rt import _ext
from cascade_rt.ops import attention
from cascade_rt.ops.registry import backends

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# name: (B, Nq, Nk, Nc, H, D)
SHAPES = {
    "one_query": (1, 1, 7, 3, 2, 64),
    "one_key": (1, 5, 1, 0, 2, 64),
    "one_key_one_cond": (1, 9, 1, 1, 1, 64),
    "no_cond": (2, 70, 65, 0, 1, 64),
    "cond4": (1, 33, 64, 4, 2, 64),
    "unaligned": (1, 67, 129, 5, 1, 64),
    "d16": (1, 20, 30, 4, 2, 16),
    "d32": (1, 40, 50, 4, 1, 32),
    "d40": (1, 17, 19, 3, 1, 40),
    "d128": (1, 65, 70, 4, 1, 128),
    "d256": (1, 20, 40, 5, 1, 256),
    # The real shapes at reduced batch and heads (Stage C and Stage B at 1024x1024).
    "stage_c": (1, 576, 576, 85, 1, 64),
    "stage_b_32x32": (1, 1024, 1024, 4, 1, 64),
    "stage_b_16x16": (1, 256, 256, 4, 2, 64),
}


def _cpu_backends() -> list[str]:
    # On a GPU machine Triton is tested on the GPU instead.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return ["torch"] + (["triton"] if HAS_TRITON and not CUDA and interpreted else [])


def _make(shape, dtype, device="cpu", fused=False, seed=0):
    """q, k, v, k2, v2 for `shape`; with fused=True, strided slices of fused projections."""
    b, nq, nk, nc, h, d = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    if fused:
        # Self-attention layout: q, k, v are slices of one [B, N, 3, H, D] projection output;
        # the condition's k2, v2 slices of a [B, Nc, 2, H, D] one.
        qkv = randn(b, max(nq, nk), 3, h, d)
        q, k, v = qkv[:, :nq, 0], qkv[:, :nk, 1], qkv[:, :nk, 2]
        k2 = v2 = None
        if nc:
            kv2 = randn(b, nc, 2, h, d)
            k2, v2 = kv2[:, :, 0], kv2[:, :, 1]
        return q, k, v, k2, v2
    q, k, v = randn(b, nq, h, d), randn(b, nk, h, d), randn(b, nk, h, d)
    k2, v2 = (randn(b, nc, h, d), randn(b, nc, h, d)) if nc else (None, None)
    return q, k, v, k2, v2


def _cat(k, k2):
    return k if k2 is None else torch.cat([k, k2], dim=1)


def _reference(q, k, v, k2, v2) -> torch.Tensor:
    """float64 cat + softmax; [B, Nq, H, D]."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, _cat(k, k2), _cat(v, v2)))
    s = qd @ kd.transpose(-1, -2) / q.shape[-1] ** 0.5
    return (s.softmax(-1) @ vd).transpose(1, 2)


def _torch_error(q, k, v, k2, v2, ref) -> float:
    """PyTorch's own error: SDPA in the inputs' dtype against the float64 reference."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, _cat(k, k2), _cat(v, v2)))
    o = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
    return (o.double() - ref).abs().max().item()


def _check(out, inputs, ref=None) -> None:
    ref = _reference(*inputs) if ref is None else ref
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    half_ulp = torch.finfo(out.dtype).eps / 2 * ref.abs().max().item()
    bound = 2 * _torch_error(*inputs, ref) + half_ulp
    assert err <= bound, f"max abs error {err:.3e} > bound {bound:.3e}"


def _skip_unsupported(backend: str, device: str, dtype: torch.dtype, d: int) -> None:
    impl = backends("attention")[backend]
    if not impl.supports(device=torch.device(device), dtype=dtype, head_dim=d):
        pytest.skip(f"{backend} does not take head dim {d} on {device}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("backend", _cpu_backends())
def test_shapes(backend, name, dtype):
    inputs = _make(SHAPES[name], dtype)
    _check(attention(*inputs, backend=backend), inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["cond4", "unaligned", "stage_b_16x16"])
@pytest.mark.parametrize("backend", _cpu_backends())
def test_strided_views(backend, name, dtype):
    inputs = _make(SHAPES[name], dtype, fused=True)
    assert not inputs[0].is_contiguous()
    _check(attention(*inputs, backend=backend), inputs)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_non_unit_head_stride(backend):
    # Every other element of a wider tensor: the op copies these to a unit-stride head dim.
    b, nq, nk, nc, h, d = SHAPES["cond4"]
    wide = _make((b, nq, nk, nc, h, 2 * d), torch.float32)
    inputs = tuple(t[..., ::2] for t in wide)
    _check(attention(*inputs, backend=backend), inputs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", _cpu_backends())
def test_out_poisoned(backend, dtype):
    # A NaN-filled `out` must be fully overwritten, and returned as is.
    inputs = _make(SHAPES["unaligned"], dtype)
    out = torch.full_like(inputs[0], float("nan"))
    assert attention(*inputs, out=out, backend=backend) is out
    _check(out, inputs)


def test_bad_inputs():
    q, k, v, k2, v2 = _make(SHAPES["cond4"], torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        attention(q, k.half(), v)
    with pytest.raises(ValueError, match="is on meta"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="expected"):
        attention(q, k[:, :, :1], v[:, :, :1])  # head count differs from q's
    with pytest.raises(ValueError, match="expected"):
        attention(q, k[..., :32], v[..., :32])  # head dim differs from q's
    with pytest.raises(ValueError, match="tokens"):
        attention(q, k, v[:, :-1])
    with pytest.raises(ValueError, match="exceeds"):
        big = torch.zeros(1, 2, 1, 257)
        attention(big, big, big)
    with pytest.raises(ValueError, match="empty"):
        attention(q[:, :0], k, v)
    with pytest.raises(ValueError, match="empty"):
        attention(q, k, v, k2[:, :0], v2[:, :0])
    with pytest.raises(ValueError, match="together"):
        attention(q, k, v, k2, None)
    with pytest.raises(ValueError, match="together"):
        attention(q, k, v, None, v2)
    with pytest.raises(ValueError, match="dims"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="out has shape"):
        attention(q, k, v, out=torch.empty(1, 1, 1, 1))
    with pytest.raises(TypeError, match="out has dtype"):
        attention(q, k, v, out=torch.empty_like(q, dtype=torch.float16))


# ----------------------------------------------------------------------------- GPU


def _gpu_backends() -> list[str]:
    return [n for n in ("cuda", "triton", "torch") if n in backends("attention")]


def _skip_without_backend(backend: str) -> None:
    if backend == "cuda" and not _ext.has_cuda():
        pytest.skip("extension built without CUDA")
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", SHAPES)
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_shapes(backend, name, dtype):
    _skip_without_backend(backend)
    _skip_unsupported(backend, "cuda", dtype, SHAPES[name][-1])
    inputs = _make(SHAPES[name], dtype, device="cuda")
    out = torch.full_like(inputs[0], float("nan"))
    attention(*inputs, out=out, backend=backend)
    _check(out, inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["one_query", "unaligned", "d40", "stage_c"])
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_strided_views(backend, name, dtype):
    _skip_without_backend(backend)
    _skip_unsupported(backend, "cuda", dtype, SHAPES[name][-1])
    inputs = _make(SHAPES[name], dtype, device="cuda", fused=True)
    _check(attention(*inputs, backend=backend), inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_misaligned_views(backend, dtype):
    # Views starting one element into rows of D + 1: no pointer or stride is 16-byte aligned,
    # so the CUDA kernels take their element-wise copy path.
    _skip_without_backend(backend)
    b, nq, nk, nc, h, d = SHAPES["unaligned"]
    wide = _make((b, nq, nk, nc, h, d + 1), dtype, device="cuda")
    inputs = tuple(t[..., 1:] for t in wide)
    _check(attention(*inputs, backend=backend), inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_real_stage_c(backend):
    # The full Stage C shape (batch 2 for CFG, 32 heads) in bf16.
    _skip_without_backend(backend)
    inputs = _make((2, 576, 576, 85, 32, 64), torch.bfloat16, device="cuda", fused=True)
    _check(attention(*inputs, backend=backend), inputs)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", _gpu_backends())
def test_gpu_cuda_graph(backend):
    # Captured once, replayed on new inputs copied into the static ones: equal to eager.
    _skip_without_backend(backend)
    shape = SHAPES["stage_b_16x16"]
    static = _make(shape, torch.bfloat16, device="cuda", fused=True)
    out = torch.empty_like(static[0])
    graph = capture(lambda: attention(*static, out=out, backend=backend))
    fresh = _make(shape, torch.bfloat16, device="cuda", fused=True, seed=1)
    for dst, src in zip(static, fresh, strict=True):
        if dst is not None:
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager = attention(*fresh, backend=backend)
    assert torch.equal(out, eager)
