"""layernorm2d and its fused forms on every backend against a float64 oracle (tests/op_checks.py
has the backends, the 2x tolerance rule and the poisoned outputs)."""

from __future__ import annotations

import pytest
import torch
from op_checks import (
    ALL_BACKENDS,
    CUDA_BACKENDS,
    DTYPES,
    GPU,
    assert_2x,
    capture,
    poisoned,
    randn,
    require,
)

from cascade_rt.ops import layernorm2d
from cascade_rt.ops.reference import layernorm2d_torch

OP = "layernorm2d"
EPS = 1e-6

# x [..., C]: edges first, then the cascade's shapes at batch 1 (Stage A spatially cropped).
SHAPES = {
    "1x1": (2, 1, 1, 8),
    "single_pixel": (1, 1, 1, 64),
    "C1": (3, 4, 5, 1),
    "C3_odd_hw": (2, 5, 7, 3),
    "C33": (1, 9, 11, 33),
    "C1000": (1, 3, 5, 1000),
    "rows_2d": (37, 96),
    "C4100": (1, 2, 3, 4100),
    "C8192": (1, 1, 3, 8192),
    "C9000": (1, 1, 2, 9000),
    "stage_c": (1, 24, 24, 2048),
    "stage_b_128": (1, 128, 128, 320),
    "stage_b_64": (1, 64, 64, 640),
    "stage_b_32": (1, 32, 32, 1280),
    "stage_b_16": (1, 16, 16, 1280),
    "stage_a_64": (1, 64, 64, 384),
}
# The fused forms on an odd shape, a multi-block row and a Stage B level.
FUSED_SHAPES = {k: SHAPES[k] for k in ("C3_odd_hw", "C33", "C1000", "C4100", "stage_b_16")}
VARIANTS = ("residual", "modulate", "modulate_row", "residual_modulate", "post")


def _oracle(x, residual=None, scale=None, shift=None, post_scale=None, post_shift=None):
    """(LN output, pre) in float64 from the (already rounded) inputs, by the textbook formula."""
    m = x.double()
    if residual is not None:
        m = m + residual.double()
    if scale is not None:
        per_sample = (scale.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        m = m * (1 + scale.double().reshape(per_sample)) + shift.double().reshape(per_sample)
    mean = m.mean(-1, keepdim=True)
    var = ((m - mean) ** 2).mean(-1, keepdim=True)
    y = (m - mean) / torch.sqrt(var + EPS)
    if post_scale is not None:
        y = y * (1 + post_scale.double().reshape(())) + post_shift.double().reshape(())
    return y, m


def _inputs(variant: str, shape, dtype, device, seed: int = 0) -> dict:
    x = randn(shape, dtype, device, seed, scale=2.0, offset=0.5)
    kw: dict = {}
    b, c = shape[0], shape[-1]
    if "residual" in variant:
        kw["residual"] = randn(shape, dtype, device, seed + 1)
    if variant in ("modulate", "residual_modulate"):
        # TimestepBlock's (a, b) are the two halves of one [B, 2C] projection: strided views.
        ab = randn((b, 2 * c), dtype, device, seed + 2, scale=0.5)
        kw["scale"], kw["shift"] = ab.chunk(2, dim=1)
    if variant == "modulate_row":  # one r-embedding row for the whole batch
        kw["scale"] = randn((1, c), dtype, device, seed + 3, scale=0.5)
        kw["shift"] = randn((1, c), dtype, device, seed + 4)
    if variant == "post":  # Stage A: gammas[0], gammas[1] as 0-dim views
        g = randn((6,), dtype, device, seed + 5)
        kw["post_scale"], kw["post_shift"] = g[0], g[1]
    return {"x": x, **kw}


def _check(backend: str, inputs: dict, name: str) -> None:
    x = inputs["x"]
    fused = "residual" in inputs or "scale" in inputs
    out = poisoned(x.shape, x.dtype, x.device)
    pre = poisoned(x.shape, x.dtype, x.device) if fused else None
    got = layernorm2d(**inputs, eps=EPS, out=out, pre_out=pre, backend=backend)
    if fused:
        assert got[0] is out and got[1] is pre
    else:
        assert got is out
    own_out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    own_pre = torch.empty_like(own_out) if fused else None
    extra = {k: v for k, v in inputs.items() if k != "x"}
    layernorm2d_torch(x, own_out, EPS, **extra, pre=own_pre)
    ref_out, ref_pre = _oracle(**inputs)
    assert_2x(f"{name} out", backend, out, own_out, ref_out)
    if fused:
        assert_2x(f"{name} pre", backend, pre, own_pre, ref_pre)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_plain(backend, device, shape_name, dtype):
    inputs = _inputs("plain", SHAPES[shape_name], dtype, device)
    require(OP, backend, inputs["x"], channels=inputs["x"].shape[-1])
    _check(backend, inputs, shape_name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape_name", list(FUSED_SHAPES))
@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_fused(backend, device, shape_name, variant, dtype):
    inputs = _inputs(variant, FUSED_SHAPES[shape_name], dtype, device, seed=7)
    require(OP, backend, inputs["x"], channels=inputs["x"].shape[-1])
    _check(backend, inputs, f"{shape_name}/{variant}")


@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_large_mean_fp32(backend, device):
    """Mean 1000x the spread: a two-pass variance keeps full accuracy where E[x^2] - E[x]^2
    would lose it all."""
    x = randn((3, 5, 7, 1000), torch.float32, device, seed=3, offset=1000.0)
    require(OP, backend, x, channels=1000)
    _check(backend, {"x": x}, "large_mean")


@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_noncontiguous(backend, device):
    """Permuted NCHW storage, channel slices and a strided residual/modulation are accepted."""
    dtype = torch.float32
    x_nchw = randn((2, 40, 6, 5), dtype, device, seed=11)
    x = x_nchw.permute(0, 2, 3, 1)  # [B, H, W, C] view of NCHW storage: not contiguous
    wide = randn((2, 6, 5, 72), dtype, device, seed=12)
    residual = wide[..., 10:50]  # channel slice
    ab = randn((2, 3 * 40), dtype, device, seed=13)
    scale, shift = ab[:, :40], ab[:, 80:]  # row stride 120, not the same as a chunk pair
    assert not x.is_contiguous() and not residual.is_contiguous()
    require(OP, backend, x, channels=40)
    _check(backend, {"x": x, "residual": residual, "scale": scale, "shift": shift}, "strided")
    _check(backend, {"x": x}, "permuted")


@pytest.mark.parametrize(("backend", "device"), ALL_BACKENDS)
def test_allocates_outputs(backend, device):
    x = randn((2, 3, 4, 24), torch.bfloat16, device, seed=5)
    r = randn((2, 3, 4, 24), torch.bfloat16, device, seed=6)
    require(OP, backend, x, channels=24)
    y = layernorm2d(x, backend=backend)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape and y.dtype == x.dtype
    y2, pre = layernorm2d(x, residual=r, backend=backend)
    torch.testing.assert_close(y2, layernorm2d(x + r, backend="torch"), atol=0.02, rtol=0)
    torch.testing.assert_close(
        pre, x + r, atol=0, rtol=2**-7
    )  # 1 bf16 ulp: the interpreter truncates


def _bad_calls(x: torch.Tensor):
    meta = torch.empty(x.shape, dtype=x.dtype, device="meta")
    ab = torch.zeros(2, x.shape[-1], dtype=x.dtype)
    g = torch.zeros(2, dtype=x.dtype)
    return {
        "float64": (TypeError, lambda: layernorm2d(x.double())),
        "int": (TypeError, lambda: layernorm2d(x.to(torch.int32))),
        "empty": (ValueError, lambda: layernorm2d(x[:0])),
        "residual_device": (ValueError, lambda: layernorm2d(x, residual=meta)),
        "residual_dtype": (TypeError, lambda: layernorm2d(x, residual=x.half())),
        "residual_shape": (ValueError, lambda: layernorm2d(x, residual=x[:1])),
        "scale_alone": (ValueError, lambda: layernorm2d(x, scale=ab)),
        "scale_batch": (ValueError, lambda: layernorm2d(x, scale=ab[:1].expand(3, -1), shift=ab)),
        "scale_channels": (ValueError, lambda: layernorm2d(x, scale=ab[:, 1:], shift=ab[:, 1:])),
        "scale_1d_x": (ValueError, lambda: layernorm2d(x[0, 0, 0], scale=ab, shift=ab)),
        "post_alone": (ValueError, lambda: layernorm2d(x, post_scale=g[0])),
        "post_numel": (ValueError, lambda: layernorm2d(x, post_scale=g, post_shift=g)),
        "pre_out_unfused": (ValueError, lambda: layernorm2d(x, pre_out=torch.empty_like(x))),
        "out_shape": (ValueError, lambda: layernorm2d(x, out=x[:1].clone())),
        "out_dtype": (TypeError, lambda: layernorm2d(x, out=x.half())),
        "out_strided": (
            ValueError,
            lambda: layernorm2d(x, out=torch.empty_like(x).transpose(1, 2)),
        ),
        "unknown_backend": (ValueError, lambda: layernorm2d(x, backend="nope")),
    }


@pytest.mark.parametrize("case", list(_bad_calls(torch.zeros(2, 3, 4, 8))))
def test_bad_inputs(case):
    exc, call = _bad_calls(torch.zeros(2, 3, 4, 8))[case]
    with pytest.raises(exc, match=OP):
        call()


@GPU
@pytest.mark.parametrize(("backend", "device"), CUDA_BACKENDS)
def test_cuda_graph_replay_equals_eager(backend, device):
    dtype = torch.bfloat16
    x = randn((2, 24, 24, 2048), dtype, device, seed=21)
    r = randn(x.shape, dtype, device, seed=22)
    scale, shift = randn((2, 4096), dtype, device, seed=23, scale=0.3).chunk(2, dim=1)
    require(OP, backend, x, channels=2048)
    out, pre = torch.empty_like(x), torch.empty_like(x)

    def step():
        layernorm2d(x, residual=r, scale=scale, shift=shift, out=out, pre_out=pre, backend=backend)

    graph = capture(step)
    eager_out, eager_pre = out.clone(), pre.clone()
    out.zero_()
    pre.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager_out) and torch.equal(pre, eager_pre)
