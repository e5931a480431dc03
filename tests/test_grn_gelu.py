"""grn_gelu (GELU + GlobalResponseNorm) and its folded form on every backend against a float64
oracle (tests/op_checks.py has the backends, the 2x tolerance rule and the poisoned outputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_checks import (
    ALL_BACKENDS,
    CPU_BACKENDS,
    CUDA_BACKENDS,
    DTYPES,
    GPU,
    assert_2x,
    capture,
    poisoned,
    randn,
    require,
)

from cascade_rt.ops.grn_gelu import fold_grn_bias, grn_folded_linear, grn_gelu, grn_gelu_folded
from cascade_rt.ops.reference import grn_gelu_torch

OP = "grn_gelu"

# h [B, H, W, C]: edges first, then the GRN inputs of the cascade (4c channels) at batch 1.
SHAPES = {
    "1x1": (2, 1, 1, 8),
    "single_pixel_C3": (1, 1, 1, 3),
    "C33_odd_hw": (2, 5, 7, 33),
    "C1000_odd_hw": (1, 7, 9, 1000),
    "hw_1000_px": (2, 25, 40, 12),  # several pixel tiles, an unaligned last one
    "stage_c": (1, 24, 24, 8192),
    "stage_b_128": (1, 128, 128, 1280),
    "stage_b_64": (1, 64, 64, 2560),
    "stage_b_32": (1, 32, 32, 5120),
    "stage_b_16": (1, 16, 16, 5120),
}


def _oracle(h, gamma, beta):
    """(GRN output, g, scale) in float64 from the rounded inputs, by ARCHITECTURE.md §2."""
    g = F.gelu(h.double())
    gx = torch.sqrt((g * g).sum(dim=(1, 2), keepdim=True))  # [B, 1, 1, C]
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    y = gamma.double() * (g * nx) + beta.double() + g
    return y, g, (1 + gamma.double() * nx).reshape(h.shape[0], h.shape[-1])


def _inputs(shape, dtype, device, seed=0):
    c = shape[-1]
    h = randn(shape, dtype, device, seed, scale=1.5, offset=-0.2)
    gamma = randn((1, 1, 1, c), dtype, device, seed + 1, scale=0.5)  # the module's param shape
    beta = randn((1, 1, 1, c), dtype, device, seed + 2, scale=0.5)
    return h, gamma, beta


def _check_plain(backend, h, gamma, beta, name):
    out = poisoned(h.shape, h.dtype, h.device)
    assert grn_gelu(h, gamma, beta, out=out, backend=backend) is out
    own = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    c = h.shape[-1]
    grn_gelu_torch(h.contiguous(), gamma.reshape(c), beta.reshape(c), own)
    ref, _, _ = _oracle(h, gamma.reshape(c), beta.reshape(c))
    assert_2x(name, backend, out, own, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_plain(backend, device, shape_name, dtype):
    h, gamma, beta = _inputs(SHAPES[shape_name], dtype, device)
    require(OP, backend, h, channels=h.shape[-1])
    _check_plain(backend, h, gamma, beta, shape_name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", ["1x1", "C33_odd_hw", "hw_1000_px", "stage_b_16"])
@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_folded(backend, device, shape_name, dtype):
    h, gamma, beta = _inputs(SHAPES[shape_name], dtype, device, seed=3)
    require(OP, backend, h, channels=h.shape[-1])
    b, c = h.shape[0], h.shape[-1]
    g = poisoned(h.shape, h.dtype, h.device)
    scale = poisoned((b, c), torch.float32, h.device)
    got = grn_gelu_folded(h, gamma, out=g, scale_out=scale, backend=backend)
    assert got[0] is g and got[1] is scale
    own_g = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    own_scale = torch.empty((b, c), dtype=torch.float32, device=h.device)
    grn_gelu_torch(h, gamma.reshape(c), None, own_g, own_scale)
    _, ref_g, ref_scale = _oracle(h, gamma.reshape(c), beta.reshape(c))
    assert_2x(f"{shape_name} g", backend, g, own_g, ref_g)
    assert_2x(f"{shape_name} scale", backend, scale, own_scale, ref_scale)


@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_noncontiguous(backend, device):
    h_nchw = randn((2, 48, 5, 6), torch.float32, device, seed=9)
    h = h_nchw.permute(0, 2, 3, 1)  # [B, H, W, C] view of NCHW storage
    wide = randn((2, 5, 6, 80), torch.float32, device, seed=10)
    gamma, beta = wide[0, 0, 0, :48], wide[1, 1, 1, 16:64]
    require(OP, backend, h, channels=48)
    _check_plain(backend, h, gamma, beta, "permuted")
    _check_plain(backend, wide[..., 8:56], gamma, beta, "channel_slice")


@pytest.mark.parametrize(("backend", "device"), CPU_BACKENDS)
def test_deterministic(backend, device):
    """Partial sums are reduced in a fixed order: two runs agree bit for bit."""
    h, gamma, beta = _inputs((2, 33, 35, 96), torch.bfloat16, device, seed=4)
    require(OP, backend, h, channels=96)
    first = grn_gelu(h, gamma, beta, backend=backend)
    assert torch.equal(first, grn_gelu(h, gamma, beta, backend=backend))


def test_folded_linear_matches_linear_of_grn():
    h, gamma, beta = _inputs((2, 6, 7, 64), torch.float32, "cpu", seed=5)
    weight = randn((24, 64), torch.float32, "cpu", seed=6, scale=0.1)
    bias = randn((24,), torch.float32, "cpu", seed=7)
    expected = F.linear(grn_gelu(h, gamma, beta, backend="torch"), weight, bias)
    g, scale = grn_gelu_folded(h, gamma, backend="torch")
    got = grn_folded_linear(g, scale, weight, fold_grn_bias(weight, bias, beta))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _bad_calls(h: torch.Tensor):
    c = h.shape[-1]
    p = torch.zeros(c, dtype=h.dtype)
    meta = torch.zeros(c, dtype=h.dtype, device="meta")
    return {
        "3d": (ValueError, lambda: grn_gelu(h[0], p, p)),
        "float64": (TypeError, lambda: grn_gelu(h.double(), p.double(), p.double())),
        "gamma_dtype": (TypeError, lambda: grn_gelu(h, p.half(), p)),
        "gamma_device": (ValueError, lambda: grn_gelu(h, meta, p)),
        "beta_numel": (ValueError, lambda: grn_gelu(h, p, p[1:])),
        "empty": (ValueError, lambda: grn_gelu(h[:, :0], p, p)),
        "out_shape": (ValueError, lambda: grn_gelu(h, p, p, out=h[:1].clone())),
        "scale_out_dtype": (
            TypeError,
            lambda: grn_gelu_folded(h, p, scale_out=torch.zeros(h.shape[0], c, dtype=h.dtype)),
        ),
        "scale_out_shape": (
            ValueError,
            lambda: grn_gelu_folded(h, p, scale_out=torch.zeros(1, c)),
        ),
    }


@pytest.mark.parametrize("case", list(_bad_calls(torch.zeros(2, 3, 4, 8, dtype=torch.bfloat16))))
def test_bad_inputs(case):
    exc, call = _bad_calls(torch.zeros(2, 3, 4, 8, dtype=torch.bfloat16))[case]
    with pytest.raises(exc, match=OP):
        call()


@GPU
@pytest.mark.parametrize("folded", [False, True], ids=["plain", "folded"])
@pytest.mark.parametrize(("backend", "device"), CUDA_BACKENDS)
def test_cuda_graph_replay_equals_eager(backend, device, folded):
    h, gamma, beta = _inputs((2, 32, 32, 5120), torch.bfloat16, device, seed=8)
    require(OP, backend, h, channels=5120)
    out = torch.empty_like(h)
    scale = torch.empty((2, 5120), dtype=torch.float32, device=device)

    def step():
        if folded:
            grn_gelu_folded(h, gamma, out=out, scale_out=scale, backend=backend)
        else:
            grn_gelu(h, gamma, beta, out=out, backend=backend)

    graph = capture(step)
    eager_out, eager_scale = out.clone(), scale.clone()
    out.zero_()
    scale.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager_out)
    if folded:
        assert torch.equal(scale, eager_scale)
