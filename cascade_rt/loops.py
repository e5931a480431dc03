"""The cascade's programs (cascade_rt/runner.py): text encoding, a stage's sampling loop, Stage A.

Each builder returns a `Program` whose static inputs are allocated once per cache key and whose
body is plain model code with no host syncs, so the same body runs eagerly on the CPU and is
captured as one CUDA graph on CUDA. A sampling loop's body holds everything that does not change
between steps outside the step loop: the conditioning (`StableCascadeUNet.prepare`: the
condition tokens' keys/values for every attention block, Stage B's effnet stem) is computed once,
and the sampler's coefficients, the guidance scale and every step's noise are static buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cascade_rt.runner import Outputs, Program
from cascade_rt.sampling import GeneratorArg, Sampler, SamplingPlan, draw_noise

Spec = tuple[tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class LoopKey:
    """Everything that changes a sampling loop's shapes or control flow."""

    stage: str  # "prior" (Stage C) or "decoder" (Stage B)
    shape: tuple[int, ...]  # [B, C, H, W] of the latent
    steps: int
    guided: bool  # the model runs on [cond; uncond] rows
    sampler: Sampler  # frozen dataclass: the recipe and its constants
    cond: tuple[tuple[str, tuple[int, ...]], ...]  # conditioning inputs and their shapes
    dtype: torch.dtype  # the model's


def _static(spec: Spec, device: torch.device) -> torch.Tensor:
    shape, dtype = spec
    return torch.zeros(shape, dtype=dtype, device=device)


class SamplingLoop:
    """Body of one stage's whole sampling loop (see the module docstring of cascade_rt/sampling).

    Static inputs: "x" (initial latent), "noise" [N, B, C, H, W] (every step's noise, drawn
    before the run by `draw_loop_noise`), "scale" (fp32 guidance scale), "model_r" [N],
    "coefs" [N, 4] (the plan's), and the conditioning inputs named in the key. Outputs: "latent"
    (the result in the model dtype) and "finite" (a bool tensor: every value of it is finite).
    """

    def __init__(self, key: LoopKey, model: nn.Module, device: torch.device) -> None:
        self.key, self.model = key, model
        self.plan = key.sampler.plan(key.steps, device, key.dtype)
        latent = (key.shape, self.plan.latent_dtype)
        self.specs: dict[str, Spec] = {
            "x": latent,
            "noise": ((key.steps, *key.shape), self.plan.latent_dtype),
            "scale": ((), torch.float32),
            "model_r": (tuple(self.plan.model_r.shape), torch.float32),
            "coefs": (tuple(self.plan.coefs.shape), torch.float32),
            **{name: (shape, key.dtype) for name, shape in key.cond},
        }
        self.on_step: Callable[[], object] | None = None  # eager runs only: a progress bar

    def values(
        self,
        x: torch.Tensor,
        noise: torch.Tensor,
        guidance_scale: float,
        cond: Mapping[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The static inputs' values for one run."""
        scale = torch.tensor(float(guidance_scale), dtype=torch.float32)
        return {
            "x": x,
            "noise": noise,
            "scale": scale,
            "model_r": self.plan.model_r,
            "coefs": self.plan.coefs,
            **cond,
        }

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> Outputs:
        key, model, sampler = self.key, self.model, self.key.sampler
        b, _, h, w = key.shape
        plan = SamplingPlan(
            key.steps, inputs["model_r"], inputs["coefs"], self.plan.device, self.plan.latent_dtype
        )
        conditions = model.prepare((h, w), **{name: inputs[name] for name, _ in key.cond})
        x, noise, scale = inputs["x"], inputs["noise"], inputs["scale"]
        rows = 2 * b if key.guided else b  # [cond; uncond] share x and r
        for i in range(key.steps):
            r = plan.model_r[i].expand(rows)  # [rows] fp32
            xm = x.to(key.dtype)  # the stability recipe keeps x in fp32
            if key.guided:
                eps_c, eps_u = model(
                    sample=torch.cat([xm, xm]), timestep_ratio=r, conditions=conditions
                ).chunk(2)
                eps = sampler.guide(eps_c, eps_u, scale)
            else:
                eps = model(sample=xm, timestep_ratio=r, conditions=conditions)
            x = sampler.step(plan, i, x, eps, noise[i])
            if self.on_step is not None:
                self.on_step()
        return {"latent": x.to(key.dtype), "finite": torch.isfinite(x).all()}


def loop_program(
    key: LoopKey, model: nn.Module, device: torch.device, *, graph: bool, pool: object
) -> Program:
    """A stage's sampling loop as a program; `program.body` is its `SamplingLoop`."""
    loop = SamplingLoop(key, model, device)
    inputs = {name: _static(spec, device) for name, spec in loop.specs.items()}
    name = f"{key.stage} loop {key.shape} x{key.steps}"
    return Program(name, inputs, loop, graph=graph, pool=pool)


def draw_loop_noise(
    sampler: Sampler,
    plan: SamplingPlan,
    shape: Sequence[int],
    generator: GeneratorArg,
    latents: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial latent and every step's noise [N, *shape], drawn from `generator` in exactly
    the order an eager loop draws them (initial noise, then one draw per step), so a seed means
    the same image with and without graphs. `latents`, when given, replaces the initial draw."""
    if latents is None:
        x = sampler.initial_noise(plan, shape, generator)
    else:
        x = latents.to(device=plan.device, dtype=plan.latent_dtype)
    first = generator[0] if isinstance(generator, Sequence) else generator
    # A CPU generator draws on the CPU (draw_noise would copy each step over): stack, copy once.
    where = torch.device("cpu") if first is not None and first.device.type == "cpu" else plan.device
    steps = [draw_noise(shape, generator, where, plan.latent_dtype) for _ in range(plan.num_steps)]
    return x, torch.stack(steps).to(plan.device, non_blocking=True)


class TextProgram:
    """Body of the text encoder: token ids and mask -> (hidden [M, 77, C], pooled [M, P])."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> Outputs:
        hidden, pooled = self.encoder(inputs["input_ids"], inputs["attention_mask"])
        return {"hidden": hidden, "pooled": pooled}


def text_program(
    encoder: nn.Module, ids_shape: tuple[int, int], device: torch.device, *, graph: bool, pool
) -> Program:
    inputs = {
        "input_ids": torch.zeros(ids_shape, dtype=torch.int64, device=device),
        "attention_mask": torch.zeros(ids_shape, dtype=torch.int64, device=device),
    }
    body = TextProgram(encoder)
    return Program(f"text_encoder {ids_shape}", inputs, body, graph=graph, pool=pool)


class DecodeProgram:
    """Body of Stage A: Stage B latents -> images in [0, 1] (scale, decode, clamp)."""

    def __init__(self, vqgan: nn.Module, scale_factor: float) -> None:
        self.vqgan, self.scale_factor = vqgan, scale_factor

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> Outputs:
        images = self.vqgan.decode(inputs["latents"] * self.scale_factor).clamp(0, 1)
        return {"images": images}  # [B, 3, H, W]


def decode_program(
    vqgan: nn.Module,
    scale_factor: float,
    latent_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    *,
    graph: bool,
    pool,
) -> Program:
    inputs = {"latents": torch.zeros(latent_shape, dtype=dtype, device=device)}
    body = DecodeProgram(vqgan, scale_factor)
    return Program(f"vqgan {latent_shape}", inputs, body, graph=graph, pool=pool)
