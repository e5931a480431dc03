"""The load-time fp16 rescale of the UNet residual stream (cascade_rt/models/fp16_rescale.py).

Exactness: on random-weight models in fp32 the rescaled model's output equals the original's
within 1e-6 of max|ref| (max abs error / max|ref|), while the measured stream of the rescaled
groups shrinks by exactly the factor (same tolerance) and the other groups' stays put.
Overflow: a tiny prior whose last up group's residual adds are blown up by 2^17 (stream ~2e6
in fp32) gives inf/NaN in fp16; rescaled, the fp16 output is finite and within 4e-3 of the fp32
output, and closer than the same model run in bf16 (measured on CPU: fp16 1.1e-3, bf16 8.9e-3).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from cascade_rt.loading import load_cascade_components
from cascade_rt.models.fp16_rescale import (
    CALIBRATION_HEADROOM,
    DEFAULT_SCALE,
    FP16_MAX,
    calibrate_scale,
    measure_stream_max,
    rescale_for_fp16,
    scale_for_max,
)
from cascade_rt.models.unet import StableCascadeUNet, UNetConfig
from cascade_rt.models.unet_blocks import AttnBlock, LayerNorm2d, ResBlock
from cascade_rt.random_weights import (
    TINY_DECODER_CONFIG,
    TINY_PRIOR_CONFIG,
    build_random_models,
    randomize_,
)

EXACT_TOL = 1e-6  # max abs error / max|ref|, fp32
FP16_TOL = 4e-3  # max abs error / max|ref|, rescaled fp16 against fp32
CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
    ),
]
RES, TS, ATT = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
# Repeat mappers on both paths (3 repeats in the rescaled group), bilinear level switching (the
# 6x9 latent comes back 6x8, so the skip resize runs), and a last group whose AttnBlock takes
# only a residual (C-A fused) followed by an unfused TimestepBlock.
PRIOR_REPEATS = {
    **TINY_PRIOR_CONFIG,
    "down_blocks_repeat_mappers": [2, 1],
    "up_blocks_repeat_mappers": [2, 3],
    "block_types_per_layer": [[RES, ATT, TS], [RES, TS, ATT]],
    "switch_level": [True],
}
CONFIGS = {
    "prior": (TINY_PRIOR_CONFIG, (6, 9)),
    "prior_repeats": (PRIOR_REPEATS, (6, 9)),
    "decoder": (TINY_DECODER_CONFIG, (26, 38)),  # odd sizes: every up step resizes to the skip
}


def _model(name: str, seed: int = 0, device: str = "cpu") -> StableCascadeUNet:
    with torch.device("meta"):
        model = StableCascadeUNet(UNetConfig.from_dict(CONFIGS[name][0]))
    return randomize_(model.to_empty(device=device), seed).eval()


def _inputs(name: str, seed: int, batch: int = 2) -> dict[str, torch.Tensor]:
    cfg, hw = CONFIGS[name]
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    inputs = {
        "sample": randn(batch, cfg["in_channels"], *hw),
        "timestep_ratio": torch.rand(batch, generator=gen),
        "clip_text_pooled": randn(batch, 1, cfg["clip_text_pooled_in_channels"]),
    }
    if cfg["clip_text_in_channels"] is not None:
        inputs["clip_text"] = randn(batch, 7, cfg["clip_text_in_channels"])
        inputs["clip_img"] = randn(batch, 1, cfg["clip_image_in_channels"])
    if cfg["effnet_in_channels"] is not None:
        inputs["effnet"] = randn(batch, cfg["effnet_in_channels"], 5, 7)
    return inputs


@torch.no_grad()
def _run(model: StableCascadeUNet, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    dtype, device = model.dtype, model.device
    cast = {
        k: v.to(device) if k == "timestep_ratio" else v.to(device, dtype) for k, v in inputs.items()
    }
    return model(**cast).float()


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _eps(model: torch.nn.Module) -> dict[str, float]:
    return {name: m.eps for name, m in model.named_modules() if isinstance(m, LayerNorm2d)}


@pytest.mark.parametrize(
    ("name", "groups", "scale"),
    [
        ("prior", None, 2.0**-3),
        ("prior", None, DEFAULT_SCALE),
        ("prior_repeats", None, 2.0**-5),
        ("decoder", (1, 2, 3), 2.0**-4),
        ("decoder", (2,), DEFAULT_SCALE),
    ],
)
def test_fp32_output_is_unchanged(name, groups, scale):
    model = _model(name, seed=len(name))
    inputs = _inputs(name, seed=3)
    hw = CONFIGS[name][1]
    ref = _run(model, inputs)
    before = measure_stream_max(model, hw, ratios=(0.7,))
    report = rescale_for_fp16(model, scale=scale, groups=groups)
    out = _run(model, inputs)
    after = measure_stream_max(model, hw, ratios=(0.7,))
    err = _rel_err(out, ref)
    print(f"{name} groups={report.groups} s={scale:g}: rel err {err:.1e}; {report.summary()}")
    assert err <= EXACT_TOL
    assert report.groups == (groups or (len(model.up_blocks) - 1,))
    for g, (b, a) in enumerate(zip(before, after, strict=True)):
        want = b * scale if g in report.groups else b
        assert abs(a - want) <= EXACT_TOL * want, (g, a, want)


def test_report_names_every_stream_writer_and_reader():
    model = _model("prior")
    eps = _eps(model)
    report = rescale_for_fp16(model, scale=0.5)
    c = TINY_PRIOR_CONFIG["block_out_channels"][0]
    assert report.tensors == (
        "up_upscalers.0.1.blocks.1.weight",
        "up_upscalers.0.1.blocks.1.bias",
        "up_blocks.1.0.depthwise.bias",
        "up_blocks.1.0.channelwise.4.weight",
        "up_blocks.1.0.channelwise.4.bias",
        *(
            f"up_blocks.1.1.{m}.{leaf}[{c}:]"
            for m in ("mapper", "mapper_sca", "mapper_crp")
            for leaf in ("weight", "bias")
        ),
        "up_blocks.1.2.attention.attn.out_proj.weight",
        "up_blocks.1.2.attention.attn.out_proj.bias",
    )
    assert report.norms == ("up_blocks.1.0.norm", "up_blocks.1.2.norm", "clf.0")
    changed = {name for name, e in _eps(model).items() if e != eps[name]}
    assert changed == set(report.norms)
    assert all(_eps(model)[name] == 1e-6 * 0.25 for name in changed)


def _overflowing_prior(device: str = "cpu") -> StableCascadeUNet:
    """Tiny prior whose last up group's residual adds are 2^17 too large (stream ~2e6)."""
    model = _model("prior", seed=0, device=device)
    with torch.no_grad():
        for block in model.up_blocks[-1]:
            if isinstance(block, ResBlock):
                writer = block.channelwise[4]
            elif isinstance(block, AttnBlock):
                writer = block.attention.attn.out_proj
            else:
                continue
            writer.weight.mul_(2.0**17)
            writer.bias.mul_(2.0**17)
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_synthetic_overflow_is_fixed(device):
    model = _overflowing_prior(device)
    inputs = _inputs("prior", seed=1)
    ref = _run(model, inputs)
    stream = measure_stream_max(model, CONFIGS["prior"][1], ratios=(0.7,))
    assert stream[-1] > 16 * FP16_MAX  # the test model really leaves fp16's range
    assert torch.isfinite(ref).all()

    plain = _run(copy.deepcopy(model).half(), inputs)
    assert not torch.isfinite(plain).all()

    bf16_err = _rel_err(_run(copy.deepcopy(model).bfloat16(), inputs), ref)
    fixed = copy.deepcopy(model).half()
    rescale_for_fp16(fixed)
    out = _run(fixed, inputs)
    assert torch.isfinite(out).all()
    err = _rel_err(out, ref)
    print(f"stream max {stream[-1]:.3g}: rescaled fp16 rel err {err:.2e}, bf16 {bf16_err:.2e}")
    assert err <= FP16_TOL
    assert err < bf16_err


def test_calibrated_scale_keeps_the_measured_stream_in_range():
    model = _overflowing_prior()
    hw = CONFIGS["prior"][1]
    stream = measure_stream_max(model, hw)[-1]
    scale = calibrate_scale(model, hw)
    target = FP16_MAX / CALIBRATION_HEADROOM
    assert scale * stream <= target < 2 * scale * stream  # the largest power of two that fits
    fixed = copy.deepcopy(model).half()
    rescale_for_fp16(fixed, scale=scale)
    inputs = _inputs("prior", seed=2)
    assert _rel_err(_run(fixed, inputs), _run(model, inputs)) <= FP16_TOL


def test_scale_for_max():
    target = FP16_MAX / CALIBRATION_HEADROOM
    assert scale_for_max(0.0) == 1.0
    assert scale_for_max(target) == 1.0
    assert scale_for_max(target * 1.01) == 0.5
    assert scale_for_max(target * 2**10) == 2.0**-10
    with pytest.raises(ValueError, match="not finite"):
        scale_for_max(float("inf"))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"scale": 0.3}, ValueError, "power of two"),
        ({"scale": 2.0}, ValueError, "power of two"),
        ({"scale": 0.0}, ValueError, "power of two"),
        ({"groups": (0,)}, ValueError, "group 0"),
        ({"groups": (2,)}, ValueError, r"1\.\.1"),
        ({"groups": (1, 1)}, ValueError, "distinct"),
    ],
)
def test_bad_arguments_fail_before_any_change(kwargs, error, message):
    model = _model("prior")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eps = _eps(model)
    with pytest.raises(error, match=message):
        rescale_for_fp16(model, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _eps(model) == eps


def test_meta_model_is_refused():
    with torch.device("meta"):
        model = StableCascadeUNet(UNetConfig.from_dict(TINY_PRIOR_CONFIG))
    with pytest.raises(ValueError, match="meta"):
        rescale_for_fp16(model)


def _writer(prior: StableCascadeUNet) -> torch.Tensor:
    return prior.up_blocks[-1][0].channelwise[4].weight


def test_random_weights_rescale_fp16_builds_only(tmp_path: Path, caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="cascade_rt"):
        fp32 = build_random_models("tiny", tmp_path / "a", device=cpu, dtype=torch.float32)
        bf16 = build_random_models("tiny", tmp_path / "b", device=cpu, dtype=torch.bfloat16)
        assert "fp16 rescale" not in caplog.text
        fp16 = build_random_models("tiny", tmp_path / "c", device=cpu, dtype=torch.float16)
    assert "prior: fp16 rescale: residual stream of up_blocks.1 x 2^-8" in caplog.text
    for parts in (fp32, bf16):
        assert set(_eps(parts["prior"]).values()) == {1e-6}
    assert _eps(fp16["prior"])["clf.0"] == 1e-6 * DEFAULT_SCALE**2
    assert set(_eps(fp16["decoder"]).values()) == {1e-6}
    assert torch.equal(_writer(fp16["prior"]), _writer(fp32["prior"]).half() * DEFAULT_SCALE)


# Streaming takes the same path as sequential (a rescaled host copy), where reading a streamed
# block's weights outside a forward pass would show a slot, not the block.
@pytest.mark.parametrize("memory", ["resident", "sequential"])
def test_checkpoint_loads_rescale_fp16_only(tiny, caplog, memory):
    kw = dict(
        decoder_path=None,
        device=torch.device("cpu"),
        variant=None,
        prior_lite=False,
        decoder_lite=False,
        memory=memory,
    )
    with caplog.at_level(logging.INFO, logger="cascade_rt"):
        fp32 = load_cascade_components(tiny.combined, dtype=torch.float32, **kw)["memory"]
        assert "fp16 rescale" not in caplog.text
        fp16 = load_cascade_components(tiny.combined, dtype=torch.float16, **kw)["memory"]
    assert "prior: fp16 rescale" in caplog.text
    # The weights as the stage runs them: a swapped copy must be the rescaled one.
    with fp32.use("prior"), fp16.use("prior"):
        _check_rescaled(fp32.modules, fp16.modules)
    with fp32.use("decoder"), fp16.use("decoder"):  # in sequential mode: the prior swapped out
        pass
    with fp32.use("prior"), fp16.use("prior"):  # ... and copied back in
        _check_rescaled(fp32.modules, fp16.modules)


def _check_rescaled(fp32: dict, fp16: dict) -> None:
    assert set(_eps(fp32["prior"]).values()) == {1e-6}
    assert _eps(fp16["prior"])["clf.0"] == 1e-6 * DEFAULT_SCALE**2
    assert set(_eps(fp16["decoder"]).values()) == {1e-6}
    assert torch.equal(_writer(fp16["prior"]), _writer(fp32["prior"]).half() * DEFAULT_SCALE)
