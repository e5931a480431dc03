"""Exact rescale of a UNet's residual stream so that the released big Stage C runs in fp16.

Why: in the big Stage C the residual stream of the last up-block group (`up_blocks.1`, the
"8, 24, 24, 8 <- this one" group of KBlueLeaf/Stable-Cascade-FP16-fixed) grows past fp16's
65504, so fp16 runs give inf/NaN and black images (diffusers#6970, StableCascade#128,
ComfyUI#2824); the lite model stays in range. The public fix changes that group's
TimestepBlocks only, an approximation (LPIPS 0.012-0.088 against bf16); this one is exact.

What: `rescale_for_fp16` multiplies the stream of the chosen up groups by a power of two s <= 1
and changes nothing else about the function the model computes. Inside a group the stream x is
written by adds and read by LayerNorms, so with x' = s*x:
- the entering transition's conv (`up_upscalers.<g-1>.1`, Conv1x1 or ConvTranspose2d, after
  its LayerNorm and any resize, which are linear) gets weight and bias * s, so it writes s*x;
- ResBlock: x + channelwise(cat(LN(depthwise(x)), skip)). `depthwise.bias` * s makes
  depthwise(s*x) = s*depthwise(x); its norm's eps * s^2 makes LN(s*y) = LN(y), since
  (s*y - s*mean) / sqrt(s^2*var + s^2*eps) = (y - mean) / sqrt(var + eps); the skip from the
  down path enters after that norm, unscaled; `channelwise.4` (weight, bias) * s scales the add;
- TimestepBlock: x * (1 + a) + b. The b half (rows [C:]) of every mapper (`mapper`,
  `mapper_<cond>`), weight and bias, * s; a is a gain and stays;
- AttnBlock: x + out_proj(attn(LN(x))). Norm eps * s^2, `attention.attn.out_proj` * s. The
  fused path of `StableCascadeUNet._run_blocks` (LN((h + x) * (1 + a) + b) with the ResBlock
  branch h and the TimestepBlock's (a, b)) sees s*h, s*x and s*b, so it writes the stream s*m
  and normalises the same values;
- repeat mappers (Conv1x1 between repeats): bias * s; the odd-size skip resize is linear;
- the norm that reads the group's output (the next transition's, or `clf.0` after the last
  group) gets eps * s^2.
With s a power of two every one of these products is exact in floating point (barring
subnormals), so in fp32 the rescaled model returns the original output to rounding noise.

Factor: `DEFAULT_SCALE` = 2^-8, fixed (the public fix's own constant sits in a patched source
file we could not read, and the released weights were not at hand to measure). A small s costs
almost nothing, a too large one leaves the NaNs: fp16 keeps 11 significant bits for every
|v| >= 2^-14, so only stream values below 2^-14 / s = 2^-6 land on subnormals (spacing 2^-16 in
original units), and a bf16 weight w stays exact after scaling while |w| >= 2^-17 / s = 2^-9
(smaller ones move by at most 2^-17, under the bf16 quantum of all but the smallest weights).
2^-8 leaves room for a stream of 1.6e7. `calibrate_scale` is the optional data-driven choice:
the stream's max measured on a synthetic input in an fp32 (or bf16) model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cascade_rt.models.unet import StableCascadeUNet
from cascade_rt.models.unet_blocks import AttnBlock, LayerNorm2d, ResBlock, TimestepBlock

FP16_MAX = torch.finfo(torch.float16).max  # 65504
DEFAULT_SCALE = 2.0**-8
# calibrate_scale keeps the measured max this far under fp16's range: prompts, seeds and sizes
# other than the synthetic one may go higher.
CALIBRATION_HEADROOM = 16.0


@dataclass(frozen=True)
class RescaleReport:
    """What `rescale_for_fp16` changed."""

    scale: float
    groups: tuple[int, ...]  # indices into unet.up_blocks (official keys up_blocks.<g>)
    tensors: tuple[str, ...]  # parameters multiplied by scale ("name[C:]": its second half)
    norms: tuple[str, ...]  # LayerNorm2d modules whose eps was multiplied by scale**2

    def summary(self) -> str:
        groups = ", ".join(f"up_blocks.{g}" for g in self.groups)
        return (
            f"fp16 rescale: residual stream of {groups} x 2^{round(math.log2(self.scale))} "
            f"({len(self.tensors)} tensors scaled, eps x 2^{round(2 * math.log2(self.scale))} "
            f"on {len(self.norms)} LayerNorms)"
        )


def _check_scale(scale: float) -> float:
    if not isinstance(scale, (int, float)) or not 0 < scale <= 1 or math.frexp(scale)[0] != 0.5:
        raise ValueError(f"fp16 rescale: scale must be a power of two in (0, 1], got {scale!r}")
    return float(scale)


def _check_groups(unet: StableCascadeUNet, groups: Sequence[int] | None) -> tuple[int, ...]:
    n = len(unet.up_blocks)
    if groups is None:
        return (n - 1,)
    chosen = tuple(groups)
    bad = [g for g in chosen if not isinstance(g, int) or not 1 <= g < n]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(
            f"fp16 rescale: groups must be distinct up_blocks indices in 1..{n - 1} (group 0's "
            f"stream comes from the down path, not from a transition), got {list(chosen)}"
        )
    return tuple(sorted(chosen))


def _group_plan(
    unet: StableCascadeUNet, g: int
) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[str, LayerNorm2d]]]:
    """(tensors to multiply by s, norms whose eps to multiply by s^2) for up group g."""
    tensors: list[tuple[str, torch.Tensor]] = []
    norms: list[tuple[str, LayerNorm2d]] = []

    def whole(prefix: str, module: nn.Module, names: tuple[str, ...] = ("weight", "bias")) -> None:
        for name in names:
            tensors.append((f"{prefix}.{name}", getattr(module, name)))

    entry = unet.up_upscalers[g - 1][1]  # the conv after the transition's LayerNorm
    for name, p in entry.named_parameters():
        tensors.append((f"up_upscalers.{g - 1}.1.{name}", p))
    for k, block in enumerate(unet.up_blocks[g]):
        prefix = f"up_blocks.{g}.{k}"
        if isinstance(block, ResBlock):
            whole(f"{prefix}.depthwise", block.depthwise, ("bias",))
            whole(f"{prefix}.channelwise.4", block.channelwise[4])
            norms.append((f"{prefix}.norm", block.norm))
        elif isinstance(block, TimestepBlock):
            c = block.mapper.out_features // 2
            for name in ("mapper", *(f"mapper_{cond}" for cond in block.conds)):
                linear = getattr(block, name)
                for leaf in ("weight", "bias"):
                    tensors.append((f"{prefix}.{name}.{leaf}[{c}:]", getattr(linear, leaf)[c:]))
        elif isinstance(block, AttnBlock):
            whole(f"{prefix}.attention.attn.out_proj", block.attention.attn.out_proj)
            norms.append((f"{prefix}.norm", block.norm))
        else:
            raise TypeError(f"fp16 rescale: no rule for {type(block).__name__} at {prefix}")
    for r, mapper in enumerate(unet.up_repeat_mappers[g]):
        whole(f"up_repeat_mappers.{g}.{r}", mapper, ("bias",))
    last = g == len(unet.up_blocks) - 1
    exit_norm = unet.clf[0] if last else unet.up_upscalers[g][0]
    norms.append(("clf.0" if last else f"up_upscalers.{g}.0", exit_norm))
    return tensors, norms


def rescale_for_fp16(
    unet: StableCascadeUNet,
    *,
    scale: float = DEFAULT_SCALE,
    groups: Sequence[int] | None = None,
) -> RescaleReport:
    """Scales the residual stream of up groups `groups` (default: the last, `up_blocks.<n-1>`)
    by `scale` (a power of two in (0, 1]) in place, leaving the model's output unchanged (see the
    module docstring for the rules). Works in any dtype; the loaders call it for fp16 runs only.

    Applying it twice compounds (s1 * s2), still exactly. Everything is checked before any
    weight changes.
    """
    if not isinstance(unet, StableCascadeUNet):
        raise TypeError(f"fp16 rescale: expected a StableCascadeUNet, got {type(unet).__name__}")
    scale = _check_scale(scale)
    chosen = _check_groups(unet, groups)
    if unet.device.type == "meta":
        raise ValueError("fp16 rescale: the model has no weights yet (meta device); load it first")
    plans = [_group_plan(unet, g) for g in chosen]
    with torch.no_grad():
        for tensors, norms in plans:
            for _, t in tensors:
                t.mul_(scale)
            for _, norm in norms:
                norm.eps *= scale * scale
    return RescaleReport(
        scale=scale,
        groups=chosen,
        tensors=tuple(name for tensors, _ in plans for name, _ in tensors),
        norms=tuple(name for _, norms in plans for name, _ in norms),
    )


# ---------------------------------------------------------------- optional calibration
def _synthetic_inputs(
    unet: StableCascadeUNet, latent_hw: tuple[int, int], batch: int, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Unit-normal stand-ins for every conditioning input the model takes."""
    cfg, device, dtype = unet.config, unet.device, unet.dtype

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device, dtype)

    inputs = {
        "sample": randn(batch, cfg.in_channels, *latent_hw),
        "clip_text_pooled": randn(batch, 1, cfg.clip_text_pooled_in_channels),
    }
    if cfg.clip_text_in_channels is not None:
        inputs["clip_text"] = randn(batch, 77, cfg.clip_text_in_channels)
        inputs["clip_img"] = randn(batch, 1, cfg.clip_image_in_channels)
    if cfg.effnet_in_channels is not None:
        h, w = (max(1, n // (4 * cfg.patch_size)) for n in latent_hw)
        inputs["effnet"] = randn(batch, cfg.effnet_in_channels, h, w)
    return inputs


@torch.no_grad()
def measure_stream_max(
    unet: StableCascadeUNet,
    latent_hw: tuple[int, int],
    *,
    batch: int = 1,
    ratios: Sequence[float] = (1.0, 0.5, 0.05),
    seed: int = 0,
) -> tuple[float, ...]:
    """max |residual stream| of each up group (by up_blocks index) over forward passes on
    unit-normal inputs at the noise levels `ratios`. Run it on an fp32 or bf16 model: in fp16
    the stream it looks for has already overflowed. Host syncs; not for the sampling loop."""
    gen = torch.Generator().manual_seed(seed)
    found: list[list[torch.Tensor]] = [[] for _ in unet.up_blocks]

    def record(g: int, t: torch.Tensor) -> None:
        found[g].append(t.detach().abs().amax().float())

    def attn_inputs(g: int, args: tuple, kwargs: dict) -> None:
        x, residual, modulation = args[0], kwargs.get("residual"), kwargs.get("modulation")
        if residual is None and modulation is None:
            record(g, x)
            return
        m = x.float() if residual is None else x.float() + residual.float()
        if residual is not None:
            record(g, residual)
        if modulation is not None:
            a, b = (t.float()[:, :, None, None] for t in modulation)  # [B, C, 1, 1]
            m = m * (1 + a) + b
        record(g, m)  # the stream the fused LayerNorm writes

    def pre_hook(g: int):
        return lambda _module, args: record(g, args[0])

    def attn_pre_hook(g: int):
        return lambda _module, args, kwargs: attn_inputs(g, args, kwargs)

    def out_hook(g: int):
        return lambda _module, _args, out: record(g, out)

    handles = []
    for g, blocks in enumerate(unet.up_blocks):
        for block in blocks:
            if isinstance(block, AttnBlock):
                handles.append(block.register_forward_pre_hook(attn_pre_hook(g), with_kwargs=True))
            else:
                handles.append(block.register_forward_pre_hook(pre_hook(g)))
            handles.append(block.register_forward_hook(out_hook(g)))
        handles += [m.register_forward_hook(out_hook(g)) for m in unet.up_repeat_mappers[g]]
    try:
        for r in ratios:
            inputs = _synthetic_inputs(unet, latent_hw, batch, gen)
            ratio = torch.full((batch,), float(r), device=unet.device)
            unet(timestep_ratio=ratio, **inputs)
    finally:
        for handle in handles:
            handle.remove()
    return tuple(torch.stack(ms).max().item() if ms else 0.0 for ms in found)


def scale_for_max(stream_max: float) -> float:
    """The largest power of two s <= 1 with s * stream_max <= FP16_MAX / CALIBRATION_HEADROOM."""
    if not math.isfinite(stream_max):
        raise ValueError(
            f"fp16 rescale: stream max {stream_max} is not finite; measure on an fp32 or bf16 model"
        )
    target = FP16_MAX / CALIBRATION_HEADROOM
    return 2.0 ** -max(0, math.ceil(math.log2(max(stream_max, 1e-30) / target)))


def calibrate_scale(
    unet: StableCascadeUNet,
    latent_hw: tuple[int, int],
    *,
    groups: Sequence[int] | None = None,
    **measure: object,
) -> float:
    """Optional replacement for DEFAULT_SCALE: `scale_for_max` of the largest stream max that
    `measure_stream_max` finds in `groups` (default: the last up group)."""
    chosen = _check_groups(unet, groups)
    maxima = measure_stream_max(unet, latent_hw, **measure)
    return scale_for_max(max(maxima[g] for g in chosen))
