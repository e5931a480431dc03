"""groupnorm_silu (GroupNorm with affine + SiLU) in NCHW and channels-last on every backend against
a float64 oracle (tests/op_checks.py has the backends, the 2x tolerance rule, poisoned outputs)."""

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

from cascade_rt.ops.groupnorm_silu import groupnorm_silu
from cascade_rt.ops.reference import groupnorm_silu_torch

OP = "groupnorm_silu"
EPS = 1e-5

# (x [B, C, H, W], groups): edges first, then SD-style UNet/VAE shapes at batch 1.
SHAPES = {
    "1x1_G3": ((2, 3, 1, 1), 3),
    "single_pixel": ((1, 64, 1, 1), 8),
    "C33_G11_odd_hw": ((2, 33, 7, 5), 11),
    "C1000_G8": ((1, 1000, 3, 5), 8),
    "G1": ((2, 12, 9, 9), 1),
    "G_eq_C": ((2, 16, 6, 7), 16),
    "many_tiles": ((1, 4, 100, 90), 2),
    "sd_1280_16": ((1, 1280, 16, 16), 32),
    "sd_640_32": ((1, 640, 32, 32), 32),
    "sd_320_64": ((1, 320, 64, 64), 32),
    "sd_320_128": ((1, 320, 128, 128), 32),
}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _oracle(x, groups, weight, bias):
    y = F.group_norm(x.double(), groups, weight.double(), bias.double(), EPS)
    return F.silu(y)


def _inputs(shape, dtype, device, seed=0, fmt=torch.contiguous_format):
    x = randn(shape, dtype, device, seed, scale=2.0, offset=0.7).contiguous(memory_format=fmt)
    weight = randn(shape[1], dtype, device, seed + 1, scale=0.5, offset=1.0)
    bias = randn(shape[1], dtype, device, seed + 2, scale=0.5)
    return x, weight, bias


def _check(backend, x, groups, weight, bias, name, fmt):
    out = poisoned(x.shape, x.dtype, x.device, memory_format=fmt)
    assert groupnorm_silu(x, groups, weight, bias, eps=EPS, out=out, backend=backend) is out
    own = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    groupnorm_silu_torch(x, weight, bias, own, groups, EPS)
    assert_2x(name, backend, out, own, _oracle(x, groups, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_matches_float64(backend, device, shape_name, layout, dtype):
    shape, groups = SHAPES[shape_name]
    fmt = LAYOUTS[layout]
    x, weight, bias = _inputs(shape, dtype, device, fmt=fmt)
    require(OP, backend, x, channels=shape[1])
    _check(backend, x, groups, weight, bias, f"{shape_name}/{layout}", fmt)


@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_large_mean_fp32(backend, device):
    x, weight, bias = _inputs((2, 32, 12, 13), torch.float32, device, seed=3)
    x = x + 1000.0  # the mean 1000x the spread: no E[x^2] - E[x]^2 anywhere
    require(OP, backend, x, channels=32)
    for layout, fmt in LAYOUTS.items():
        xf = x.contiguous(memory_format=fmt)
        _check(backend, xf, 4, weight, bias, f"large_mean/{layout}", fmt)


def _large_offset_case(device):
    """Channels-last fp32 x with odd sizes, mean ~1e3 against a spread of 2, and a bound on the
    error against float64: 16 fp32 ulps of the offset, in units of the group's spread, times the
    largest |weight| (fp32 rounding of x - mean is what a correct kernel cannot avoid)."""
    x, weight, bias = _inputs((2, 33, 7, 5), torch.float32, device, seed=8)
    offset, spread = 1000.0, 2.0
    x = (x + offset).contiguous(memory_format=torch.channels_last)
    tol = 16 * torch.finfo(torch.float32).eps * offset / spread * weight.abs().max().item()
    return x, weight, bias, tol


def test_reference_channels_last_large_offset():
    """The oracle itself on channels-last data with a large mean. torch's CPU group_norm loses
    precision there (0.05-0.15 max error at a 1e3 offset, torch 2.13), which the reference must
    avoid (it normalises an NCHW copy): every backend test trusts it."""
    x, weight, bias, tol = _large_offset_case(torch.device("cpu"))
    out = poisoned(x.shape, x.dtype, x.device, memory_format=torch.channels_last)
    groupnorm_silu_torch(x, weight, bias, out, 11, EPS)
    err = (out.double() - _oracle(x, 11, weight, bias)).abs().max().item()
    assert err <= tol, f"reference max error {err:.3g} > {tol:.3g} on channels-last, offset 1e3"


@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_channels_last_large_offset_absolute(backend, device):
    """Each backend against float64 with the absolute bound above (not relative to the oracle)."""
    x, weight, bias, tol = _large_offset_case(torch.device(device))
    require(OP, backend, x, channels=33)
    out = groupnorm_silu(x, 11, weight, bias, eps=EPS, backend=backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    err = (out.double() - _oracle(x, 11, weight, bias)).abs().max().item()
    assert err <= tol, f"{backend}: max error {err:.3g} > {tol:.3g} on channels-last, offset 1e3"


@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_output_keeps_memory_format(backend, device):
    x, weight, bias = _inputs((2, 8, 5, 6), torch.bfloat16, device, seed=4)
    require(OP, backend, x, channels=8)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert groupnorm_silu(cl, 4, weight, bias, backend=backend).is_contiguous(
        memory_format=torch.channels_last
    )
    assert groupnorm_silu(x, 4, weight, bias, backend=backend).is_contiguous()


@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_noncontiguous(backend, device):
    """Channel slices and strided views (neither NCHW- nor channels-last-contiguous) run too."""
    wide, weight, bias = _inputs((2, 24, 10, 9), torch.float32, device, seed=5)
    require(OP, backend, wide, channels=16)
    w, b = weight[4:20], bias[4:20]
    _check(backend, wide[:, 4:20], 4, w, b, "nchw_slice", torch.contiguous_format)
    _check(backend, wide[:, 4:20, ::2], 4, w, b, "strided_h", torch.contiguous_format)
    cl = wide.contiguous(memory_format=torch.channels_last)[:, 4:20]
    _check(backend, cl, 4, w, b, "channels_last_slice", torch.contiguous_format)


@pytest.mark.parametrize(("backend", "device"), CPU_BACKENDS)
def test_deterministic(backend, device):
    x, weight, bias = _inputs((2, 64, 33, 31), torch.bfloat16, device, seed=6)
    require(OP, backend, x, channels=64)
    for fmt in LAYOUTS.values():
        xf = x.contiguous(memory_format=fmt)
        first = groupnorm_silu(xf, 8, weight, bias, backend=backend)
        assert torch.equal(first, groupnorm_silu(xf, 8, weight, bias, backend=backend))


def _bad_calls(x: torch.Tensor):
    c = x.shape[1]
    p = torch.ones(c, dtype=x.dtype)
    meta = torch.ones(c, dtype=x.dtype, device="meta")
    nchw_out = torch.empty_like(x)
    return {
        "groups_not_divisor": (ValueError, lambda: groupnorm_silu(x, 3, p, p)),
        "groups_zero": (ValueError, lambda: groupnorm_silu(x, 0, p, p)),
        "3d": (ValueError, lambda: groupnorm_silu(x[0], 2, p, p)),
        "float64": (TypeError, lambda: groupnorm_silu(x.double(), 2, p.double(), p.double())),
        "weight_dtype": (TypeError, lambda: groupnorm_silu(x, 2, p.half(), p)),
        "weight_device": (ValueError, lambda: groupnorm_silu(x, 2, meta, p)),
        "bias_numel": (ValueError, lambda: groupnorm_silu(x, 2, p, p[1:])),
        "empty": (ValueError, lambda: groupnorm_silu(x[:0], 2, p, p)),
        "out_shape": (ValueError, lambda: groupnorm_silu(x, 2, p, p, out=x[:1].clone())),
        "out_dtype": (TypeError, lambda: groupnorm_silu(x, 2, p, p, out=x.half())),
        "out_format": (
            ValueError,
            lambda: groupnorm_silu(
                x.contiguous(memory_format=torch.channels_last), 2, p, p, out=nchw_out
            ),
        ),
    }


@pytest.mark.parametrize("case", list(_bad_calls(torch.zeros(2, 8, 3, 4))))
def test_bad_inputs(case):
    exc, call = _bad_calls(torch.zeros(2, 8, 3, 4))[case]
    with pytest.raises(exc, match=OP):
        call()


@GPU
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(("backend", "device"), CUDA_BACKENDS)
def test_cuda_graph_replay_equals_eager(backend, device, layout):
    fmt = LAYOUTS[layout]
    x, weight, bias = _inputs((2, 320, 64, 64), torch.bfloat16, device, seed=7, fmt=fmt)
    require(OP, backend, x, channels=320)
    out = torch.empty_like(x)

    def step():
        groupnorm_silu(x, 32, weight, bias, out=out, backend=backend)

    graph = capture(step)
    eager = out.clone()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
