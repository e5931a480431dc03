"""Samplers for Stage C and Stage B: diffusers' DDPMWuerstchen and the official Stability GDF.

The pipeline owns the loop; a sampler only precomputes and applies per-step numbers, and noise is
drawn outside the math, so eager and CUDA-graph runs consume the same random numbers:

    plan = sampler.plan(num_steps, device, model_dtype)  # every coefficient, on device, fp32
    x = sampler.initial_noise(plan, shape, generator)  # [B, C, H, W] in plan.latent_dtype
    for i in range(plan.num_steps):
        r = plan.model_r[i].expand(B)  # [B] fp32 noise level for the model
        if sampler.guidance_enabled(scale):
            eps_c, eps_u = model(torch.cat([x, x]), torch.cat([r, r]), ...).chunk(2)
            eps = sampler.guide(eps_c, eps_u, scale)
        else:
            eps = model(x, r, ...)
        noise = draw_noise(x.shape, generator, plan.device, plan.latent_dtype)  # every step
        x = sampler.step(plan, i, x, eps, noise)  # after the last step, x is the result

Both recipes share one update, x' = c0 * (x - c1 * eps / c2) + c3 * noise, computed in fp32 from a
[4] row of precomputed coefficients: no host syncs and no branches on tensor values, so a step can
be captured in a CUDA graph (copy `plan.coefs[i]` into a static row and call `update`).
Facts are from ../shared/reference/ARCHITECTURE.md §7.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(
    shape: Sequence[int],
    generator: GeneratorArg,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise drawn exactly as diffusers' `randn_tensor` draws it.

    A CPU generator for another device draws on the CPU and copies the result over (the same seed
    gives the same numbers on every device); a generator on another non-CPU device is an error. A
    list of generators draws row b of the batch from generator b (a list longer than the batch
    uses its first entries, as diffusers does); a list of one is treated as a single generator.
    """
    device = torch.device(device)
    shape = tuple(shape)
    first = generator[0] if isinstance(generator, Sequence) else generator
    rand_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"cannot draw {device} noise from a {first.device.type} generator")
        rand_device = torch.device("cpu")
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, Sequence):
        if len(generator) < shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [
            torch.randn((1, *shape[1:]), generator=g, device=rand_device, dtype=dtype)
            for g in generator[: shape[0]]
        ]
        return torch.cat(rows).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a stage's loop needs, computed once before the loop."""

    num_steps: int
    model_r: torch.Tensor  # [N] fp32: noise level r the model gets at step i
    coefs: torch.Tensor  # [N, 4] fp32: (c0, c1, c2, c3) of step i, see `update`
    device: torch.device
    latent_dtype: torch.dtype  # dtype of x, of the initial noise and of every step's noise


def update(
    coefs: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """x' = c0 * (x - c1 * eps / c2) + c3 * noise in fp32, returned in x's dtype.

    coefs [4] fp32 on x's device; x, eps, noise [B, C, H, W]. The op order is diffusers', so the
    diffusers recipe is bit-identical to DDPMWuerstchenScheduler.step (tested in fp32 and bf16).
    """
    c0, c1, c2, c3 = coefs.unbind()
    # Explicit fp32: the coefficients are 0-dim, and a 0-dim fp32 tensor would not promote a
    # bf16 tensor, whereas diffusers' [B, 1, 1, 1] coefficients do.
    mu = c0 * (x.float() - c1 * eps.float() / c2)
    return (mu + c3 * noise.float()).to(x.dtype)


class Sampler(ABC):
    """The interface both recipes share; see the module docstring for the loop."""

    @abstractmethod
    def plan(
        self, num_steps: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> SamplingPlan:
        """Timesteps, model inputs and step coefficients for `num_steps` steps; `dtype` is the
        model's dtype."""

    @abstractmethod
    def guidance_enabled(self, guidance_scale: float) -> bool:
        """Whether the model runs on [cond; uncond] and `guide` combines the halves."""

    @abstractmethod
    def guide(
        self, eps_c: torch.Tensor, eps_u: torch.Tensor, guidance_scale: float | torch.Tensor
    ) -> torch.Tensor:
        """Classifier-free guidance from the conditional and unconditional halves, [B, ...] each.
        The scale may be a 0-dim fp32 tensor on eps's device (a static buffer of a graph)."""

    @abstractmethod
    def initial_noise(
        self, plan: SamplingPlan, shape: Sequence[int], generator: GeneratorArg
    ) -> torch.Tensor:
        """The starting x, drawn as the recipe's reference code draws it."""

    def step(
        self,
        plan: SamplingPlan,
        i: int,
        x: torch.Tensor,
        eps: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """x after step i of `plan` (the stability recipe's last step returns its x0, the
        result). Reads only `plan.coefs[i]`."""
        return update(plan.coefs[i], x, eps, noise)


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")


@dataclass(frozen=True)
class DDPMWuerstchen(Sampler):
    """diffusers' DDPMWuerstchenScheduler as StableCascade{Prior,Decoder}Pipeline run it (§7.2).

    Timesteps linspace(1, 0, N + 1), of which the pipelines visit the first N; the model gets
    r = t; guidance is torch.lerp(eps_u, eps_c, scale), on iff scale > 1; the step draws noise on
    every step and zeroes it on the last; the result is the final x.
    """

    s: float = 0.008
    scaler: float = 1.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DDPMWuerstchen:
        """From a diffusers scheduler_config.json dict."""
        name = config.get("_class_name", "DDPMWuerstchenScheduler")
        if name != "DDPMWuerstchenScheduler":
            raise ValueError(f"expected a DDPMWuerstchenScheduler config, got {name!r}")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in ("s", "scaler"))
        if unknown:
            raise ValueError(f"unknown DDPMWuerstchenScheduler config keys: {unknown}")
        return cls(s=float(config.get("s", 0.008)), scaler=float(config.get("scaler", 1.0)))

    def _alpha_cumprod(self, t: torch.Tensor, s: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
        # diffusers applies the scaler in t's own dtype (bf16 for a bf16 model) before the
        # 1-D fp32 `s` promotes the rest to fp32; the op order follows diffusers for bit parity.
        if self.scaler > 1:
            t = 1 - (1 - t) ** self.scaler
        elif self.scaler < 1:
            t = t**self.scaler
        acp = torch.cos((t + s) / (1 + s) * torch.pi * 0.5) ** 2 / init
        return acp.clamp(0.0001, 0.9999)

    def plan(
        self, num_steps: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> SamplingPlan:
        """The pipelines hand the scheduler and the model t.to(model dtype), so with a bf16
        model t is rounded to bf16 (0.95 -> 0.9492) in alpha_cumprod(t) and in r, while t_prev
        comes unrounded from the fp32 timesteps; the plan reproduces that with `dtype`."""
        _check_steps(num_steps)
        device = torch.device(device)
        timesteps = torch.linspace(1.0, 0.0, num_steps + 1, device=device)  # [N+1] fp32
        t = timesteps[:-1].to(dtype)  # [N], as the pipelines pass it
        # diffusers finds t_prev as the entry after the one nearest to the (rounded) t.
        index = (timesteps[None, :] - t[:, None]).abs().argmin(dim=1)
        t_prev = timesteps[index + 1]  # [N] fp32
        # A 1-D s keeps the fp32 promotion of a bf16 t; init is computed on the CPU as diffusers'
        # constructor does.
        s_cpu = torch.tensor([self.s])
        init = (torch.cos(s_cpu / (1 + s_cpu) * torch.pi * 0.5) ** 2).to(device)
        s = s_cpu.to(device)
        acp = self._alpha_cumprod(t, s, init)
        acp_prev = self._alpha_cumprod(t_prev, s, init)
        alpha = acp / acp_prev
        std = ((1 - alpha) * (1.0 - acp_prev) / (1.0 - acp)).sqrt()
        coefs = torch.stack(
            [(1.0 / alpha).sqrt(), 1 - alpha, (1 - acp).sqrt(), std * (t_prev != 0).float()],
            dim=1,
        )
        return SamplingPlan(num_steps, t.float(), coefs, device, dtype)

    def guidance_enabled(self, guidance_scale: float) -> bool:
        return guidance_scale > 1

    def guide(
        self, eps_c: torch.Tensor, eps_u: torch.Tensor, guidance_scale: float | torch.Tensor
    ) -> torch.Tensor:
        # In fp32, rounded once to eps's dtype: bit-identical to diffusers' lerp with a Python
        # scale (whose kernel also computes in fp32), and the scale may be a static fp32 tensor.
        return torch.lerp(eps_u.float(), eps_c.float(), guidance_scale).to(eps_c.dtype)

    def initial_noise(
        self, plan: SamplingPlan, shape: Sequence[int], generator: GeneratorArg
    ) -> torch.Tensor:
        # diffusers then multiplies by init_noise_sigma, which this scheduler fixes at 1.0.
        return draw_noise(shape, generator, plan.device, plan.latent_dtype)


# Official GDF schedule constants (SC gdf/schedulers.py, gdf/noise_conditions.py).
_GDF_S = 0.008
_GDF_VAR_RANGE = (1e-4, 0.9999)


def _gdf_min_var() -> float:
    return math.cos(_GDF_S / (1 + _GDF_S) * math.pi / 2) ** 2


def _gdf_logsnr(t: torch.Tensor, shift: float) -> torch.Tensor:
    """CosineSchedule: logSNR(t) with shift, clamped to the shift-1 limits. t float64."""
    var = torch.cos((t + _GDF_S) / (1 + _GDF_S) * math.pi / 2).clamp(0, 1) ** 2 / _gdf_min_var()
    var = var.clamp(*_GDF_VAR_RANGE)
    logsnr = (var / (1 - var)).log() + 2 * math.log(1 / shift)
    # The limits are logSNR(1) and logSNR(0) at shift 1, i.e. the clamped variance range.
    lo, hi = (math.log(v / (1 - v)) for v in _GDF_VAR_RANGE)
    return logsnr.clamp(lo, hi)


def _gdf_noise_cond(logsnr: torch.Tensor) -> torch.Tensor:
    """CosineTNoiseCond: the t of the shift-1 cosine schedule with this logSNR."""
    var = logsnr.sigmoid().clamp(0, 1)
    r = (var * _gdf_min_var()).sqrt().acos() / (math.pi / 2) * (1 + _GDF_S) - _GDF_S
    return r.clamp(0, 1)


@dataclass(frozen=True)
class StabilityGDF(Sampler):
    """The official sampler (§7.1): cosine schedule with `shift`, VP scaling, epsilon target,
    DDPM (eta = 1) steps with noise on every step, CFG by lerp plus CFG-rescale `cfg_rho`.

    x lives in fp32 (the official code keeps it fp32 and runs the model under autocast). The
    last step returns that step's x0, which is what the official notebooks keep.
    """

    shift: float = 1.0
    cfg_rho: float = 0.7

    def plan(
        self, num_steps: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> SamplingPlan:
        """Computed in float64 on the host, then stored fp32 on `device`. `dtype` (the model's)
        does not matter: the official code keeps x, the schedule and r in fp32."""
        _check_steps(num_steps)
        device = torch.device(device)
        t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
        logsnr = _gdf_logsnr(t, self.shift)  # [N+1]
        a2 = logsnr.sigmoid()
        a, b = a2.sqrt(), (1 - a2).sqrt()  # x_t = a * x0 + b * eps
        a_i, b_i, a_n, b_n = a[:-1], b[:-1], a[1:], b[1:]
        sigma = (b_n**2 / b_i**2).sqrt() * (1 - a_i**2 / a_n**2).sqrt()
        # x0 = (x - b_i eps) / a_i;  x' = a_n x0 + sqrt(b_n² - sigma²) eps + sigma noise
        #    = (a_n / a_i) (x - (b_i - sqrt(b_n² - sigma²) a_i / a_n) eps) + sigma noise
        c0 = a_n / a_i
        c1 = b_i - (b_n**2 - sigma**2).sqrt() * a_i / a_n
        c3 = sigma
        # The last step yields x0 itself; its noise is still drawn to keep the stream aligned.
        c0[-1], c1[-1], c3[-1] = 1 / a_i[-1], b_i[-1], 0.0
        coefs = torch.stack([c0, c1, torch.ones_like(c0), c3], dim=1)
        model_r = _gdf_noise_cond(logsnr[:-1])
        f32 = {"device": device, "dtype": torch.float32}
        return SamplingPlan(num_steps, model_r.to(**f32), coefs.to(**f32), device, torch.float32)

    def guidance_enabled(self, guidance_scale: float) -> bool:
        # The official sampler always guides; at scale 1 the guided eps equals eps_c to ~1e-9,
        # so that case skips the doubled batch.
        return guidance_scale != 1

    def guide(
        self, eps_c: torch.Tensor, eps_u: torch.Tensor, guidance_scale: float | torch.Tensor
    ) -> torch.Tensor:
        """lerp, then CFG-rescale toward eps_c's std (one std over the whole batch tensor). fp32."""
        eps_c, eps_u = eps_c.float(), eps_u.float()
        eps = torch.lerp(eps_u, eps_c, guidance_scale)
        if self.cfg_rho > 0:
            rescaled = eps * eps_c.std() / (eps.std() + 1e-9)
            eps = self.cfg_rho * rescaled + eps * (1 - self.cfg_rho)
        return eps

    def initial_noise(
        self, plan: SamplingPlan, shape: Sequence[int], generator: GeneratorArg
    ) -> torch.Tensor:
        # Without a generator the official code draws torch.randn on the CPU (global seed).
        rand_device = plan.device if generator is not None else torch.device("cpu")
        return draw_noise(shape, generator, rand_device, plan.latent_dtype).to(plan.device)


# Official shifts: Stage C samples at shift 2, Stage B at shift 1 (§7.1).
STABILITY_SHIFT = {"prior": 2.0, "decoder": 1.0}


def make_sampler(
    recipe: str, stage: str, scheduler_config: Mapping[str, Any] | None = None
) -> Sampler:
    """The sampler for `stage` ("prior" = Stage C, "decoder" = Stage B) under `recipe`.

    `scheduler_config` (a diffusers scheduler_config.json dict) configures the diffusers recipe;
    the stability recipe has a fixed schedule and ignores it.
    """
    if stage not in STABILITY_SHIFT:
        raise ValueError(f"stage must be one of {sorted(STABILITY_SHIFT)}, got {stage!r}")
    if recipe == "diffusers":
        return DDPMWuerstchen.from_config(scheduler_config or {})
    if recipe == "stability":
        return StabilityGDF(shift=STABILITY_SHIFT[stage])
    raise ValueError(f"recipe must be 'diffusers' or 'stability', got {recipe!r}")
