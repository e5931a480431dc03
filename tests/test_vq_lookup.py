"""vq_lookup on every available backend against a float64 reference.

Without CUDA the Triton kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py
sets TRITON_INTERPRET; the models never pick the interpreter on their own, see the registry).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from op_checks import capture

from cascade_rt import _ext
from cascade_rt.ops import vq_lookup

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
GPU = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _backend_param(name: str, device: str, available: bool, why: str):
    marks = [pytest.mark.skipif(not available, reason=why)]
    if device == "cuda":
        marks.append(GPU)
    return pytest.param(name, device, marks=marks, id=name)


# (backend, device it runs on)
BACKENDS = [
    _backend_param("torch", "cpu", True, ""),
    _backend_param("cpp", "cpu", _ext.available(), "extension not built"),
    # With CUDA, Triton is tested compiled on the GPU; without, in its interpreter.
    _backend_param("triton", "cuda" if HAS_CUDA else "cpu", HAS_TRITON, "triton missing"),
    _backend_param("cuda", "cuda", _ext.has_cuda() and HAS_CUDA, "no CUDA device or no CUDA build"),
]


# Named shapes (N, K, D): edges first, then Stage A's D = 4, K = 8192 at a small N.
SHAPES = {
    "1x1x1": (1, 1, 1),
    "N1": (1, 37, 4),
    "K1": (19, 1, 4),
    "D1": (33, 50, 1),
    "D3": (70, 129, 3),
    "K300_unaligned": (65, 300, 4),
    "D5": (40, 77, 5),
    "D20": (30, 90, 20),
    "D64": (48, 140, 64),
    # More rows than one CUDA block (256) and codewords than one CUDA tile (1024), both partial.
    "N260_K1100": (260, 1100, 4),
    "stage_a": (64, 8192, 4),
}


def _dist64(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Exact squared distances [N, K] in float64 (inputs are exact in float64)."""
    return ((x.double()[:, None, :] - codebook.double()[None, :, :]) ** 2).sum(-1)


def _run(backend: str, x: torch.Tensor, codebook: torch.Tensor):
    """Calls the op with NaN/out-of-range poisoned outputs, so an unwritten element fails."""
    n, d = x.shape
    indices = torch.full((n,), -(2**40), dtype=torch.int64, device=x.device)
    quantized = torch.full((n, d), float("nan"), dtype=x.dtype, device=x.device)
    got = vq_lookup(x, codebook, out=(indices, quantized), backend=backend)
    assert got[0] is indices and got[1] is quantized
    return indices, quantized


def _check(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, quantized: torch.Tensor):
    x, codebook = x.cpu(), codebook.cpu()
    indices, quantized = indices.cpu(), quantized.cpu()
    k = codebook.shape[0]
    assert indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < k)).all(), "index out of range (unwritten?)"
    dist = _dist64(x, codebook)  # [N, K]
    dmin = dist.min(dim=1).values
    chosen = dist.gather(1, indices[:, None])[:, 0]
    # Every backend sums in fp32 (torch through cdist's |x|^2 - 2x.c + |c|^2 for larger inputs), so
    # a codeword within fp32 rounding of the minimum is a correct answer. The bound is a few fp32
    # ulps of the magnitudes involved: |x|^2 + max |c|^2.
    scale = (x.double() ** 2).sum(1) + (codebook.double() ** 2).sum(1).max()
    tol = 1e-6 * scale
    assert (chosen - dmin <= tol).all(), f"max excess distance {(chosen - dmin).max().item()}"
    # Where the minimum is clear of the runner-up by more than the tolerance, the index is exact.
    if k > 1:
        top2 = dist.topk(2, dim=1, largest=False).values
        clear = top2[:, 1] - top2[:, 0] > 2 * tol
        assert torch.equal(indices[clear], dist.argmin(dim=1)[clear])
    # The quantized rows are a gather of the codebook: equal bit for bit.
    assert torch.equal(quantized, codebook[indices])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_matches_float64_reference(backend, device, shape, dtype):
    n, k, d = shape
    g = torch.Generator().manual_seed(n * 1000 + k + d)
    x = torch.randn(n, d, generator=g).to(dtype).to(device)
    codebook = torch.randn(k, d, generator=g).to(dtype).to(device)
    indices, quantized = _run(backend, x, codebook)
    _check(x, codebook, indices, quantized)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_exact_ties_take_lowest_index(backend, device):
    # Duplicated codewords give bit-identical distances in any summation order or form, so the
    # answer is exact: the first copy. Copies sit within one tile and across tile boundaries.
    g = torch.Generator().manual_seed(7)
    codebook = torch.randn(300, 4, generator=g) * 10
    x = torch.randn(8, 4, generator=g)
    targets = [(5, 290), (200, 250), (127, 128), (0, 299), (64, 65), (3, 260), (150, 151), (1, 2)]
    for row, (lo, hi) in enumerate(targets):
        codebook[lo] = codebook[hi] = x[row] + 1e-3
    # A symmetric tie: x = 0 is equally far from +e0 / 8 and -e0 / 8 (exact in every dtype).
    x[7] = 0.0
    codebook[1] = torch.tensor([0.125, 0, 0, 0])
    codebook[2] = torch.tensor([-0.125, 0, 0, 0])
    expect = torch.tensor([lo for lo, _ in targets])
    indices, quantized = _run(backend, x.to(device), codebook.to(device))
    assert torch.equal(indices.cpu(), expect)
    assert torch.equal(quantized.cpu(), codebook[expect])


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_near_ties_pick_a_minimal_codeword(backend, device):
    # Codewords a rounding error apart: any of them is right, so check the distance, not the index.
    g = torch.Generator().manual_seed(11)
    base = torch.randn(64, 4, generator=g)
    codebook = torch.cat([base, base + 1e-7 * torch.randn(64, 4, generator=g)])
    x = base + 1e-3 * torch.randn(64, 4, generator=g)
    indices, quantized = _run(backend, x.to(device), codebook.to(device))
    _check(x, codebook, indices, quantized)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_non_contiguous_inputs(backend, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 90, generator=g).to(device).t()  # [90, 4], strides (1, 90)
    codebook = torch.randn(200, 8, generator=g).to(device)[:, ::2]  # [200, 4], strides (8, 2)
    assert not x.is_contiguous() and not codebook.is_contiguous()
    indices, quantized = _run(backend, x, codebook)
    _check(x, codebook, indices, quantized)


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_allocates_outputs_without_out(backend, device):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 4, generator=g).to(device)
    codebook = torch.randn(70, 4, generator=g).to(device)
    indices, quantized = vq_lookup(x, codebook, backend=backend)
    assert indices.shape == (50,) and quantized.shape == (50, 4) and quantized.dtype == x.dtype
    _check(x, codebook, indices, quantized)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(10, 4)
    cb = torch.randn(20, 4)
    with pytest.raises(TypeError, match="codebook has dtype"):
        vq_lookup(x, cb.bfloat16())
    with pytest.raises(TypeError, match="x has dtype"):
        vq_lookup(x.long(), cb.long())
    with pytest.raises(ValueError, match="width 3 does not match x width 4"):
        vq_lookup(x, cb[:, :3])
    with pytest.raises(ValueError, match="x is empty"):
        vq_lookup(x[:0], cb)
    with pytest.raises(ValueError, match="codebook is empty"):
        vq_lookup(x, cb[:0])
    with pytest.raises(ValueError, match="must have 2 dims"):
        vq_lookup(x[None], cb)
    with pytest.raises(ValueError, match="codebook is on meta"):
        vq_lookup(x, cb.to("meta"))
    with pytest.raises(ValueError, match=r"out\[1\] \(quantized\) has shape"):
        vq_lookup(x, cb, out=(torch.empty(10, dtype=torch.int64), torch.empty(10, 3)))
    with pytest.raises(TypeError, match=r"out\[0\] \(indices\) has dtype"):
        vq_lookup(x, cb, out=(torch.empty(10, dtype=torch.int32), torch.empty(10, 4)))


@pytest.mark.skipif(not _ext.available(), reason="extension not built")
def test_width_beyond_native_limit():
    d = _ext.native().vq_max_dim + 1
    x, cb = torch.randn(6, d), torch.randn(9, d)
    with pytest.raises(ValueError, match="backend 'cpp' cannot run vq_lookup"):
        vq_lookup(x, cb, backend="cpp")
    # Without a forced backend, the op falls through to one that can (here the reference).
    indices, quantized = _run(None, x, cb)
    _check(x, cb, indices, quantized)


@GPU
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_device_mix_raises():
    with pytest.raises(ValueError, match="codebook is on cuda"):
        vq_lookup(torch.randn(4, 4), torch.randn(4, 4, device="cuda"))


@GPU
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay_equals_eager(backend):
    if backend == "cuda" and not _ext.has_cuda():
        pytest.skip("extension built without CUDA")
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton missing")
    g = torch.Generator().manual_seed(9)
    x = torch.randn(65536, 4, generator=g).bfloat16().cuda()
    codebook = torch.randn(8192, 4, generator=g).bfloat16().cuda()
    eager = vq_lookup(x, codebook, backend=backend)
    indices = torch.full_like(eager[0], -1)
    quantized = torch.full_like(eager[1], float("nan"))
    graph = capture(lambda: vq_lookup(x, codebook, out=(indices, quantized), backend=backend))
    indices.fill_(-1)
    quantized.fill_(float("nan"))
    x_new = torch.randn(65536, 4, generator=g).bfloat16().cuda()
    x.copy_(x_new)  # replay reads the static input in place
    graph.replay()
    torch.cuda.synchronize()
    expect = vq_lookup(x_new, codebook, backend=backend)
    assert torch.equal(indices, expect[0])
    assert torch.equal(quantized, expect[1])
