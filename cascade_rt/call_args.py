"""A call's arguments, checked and resolved before any model runs (diffusers' names and defaults).

`parse_call` applies the recipe's defaults, checks every argument (types, ranges, prompt and
generator counts, the size rule, `latents`), decides which stages run guided, and returns one
frozen `CallArgs`; `Cascade.__call__` then only orchestrates. Device and dtype names are resolved
here too, for `from_pretrained` and `from_random_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cascade_rt.resolution import LatentSizes, latent_sizes
from cascade_rt.sampling import GeneratorArg, Sampler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
RECIPES = ("diffusers", "stability")
# Call defaults per recipe: diffusers' StableCascadeCombinedPipeline, and the official notebooks.
DEFAULTS: dict[str, dict[str, Any]] = {
    "diffusers": {
        "height": 512,
        "width": 512,
        "prior_num_inference_steps": 60,
        "prior_guidance_scale": 4.0,
        "num_inference_steps": 12,
        "decoder_guidance_scale": 0.0,
    },
    "stability": {
        "height": 1024,
        "width": 1024,
        "prior_num_inference_steps": 20,
        "prior_guidance_scale": 4.0,
        "num_inference_steps": 10,
        "decoder_guidance_scale": 1.1,
    },
}


@dataclass(frozen=True)
class CallArgs:
    """Everything a call needs, validated; `negatives` is None when no stage is guided."""

    prompts: list[str]
    negatives: list[str] | None
    num_images_per_prompt: int
    sizes: LatentSizes
    prior_steps: int
    prior_guidance: float
    prior_guided: bool
    steps: int
    decoder_guidance: float
    decoder_guided: bool
    generator: GeneratorArg
    latents: torch.Tensor | None
    output_type: str

    @property
    def batch(self) -> int:
        """Images this call makes: prompts x num_images_per_prompt."""
        return len(self.prompts) * self.num_images_per_prompt


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _as_prompt_list(prompt: str | Sequence[str], name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {prompt!r}")


def check_number(name: str, value: Any, *, integer: bool, minimum: float) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_generator(generator: Any, batch: int, device: torch.device) -> None:
    gens = generator if isinstance(generator, list) else [generator]
    if isinstance(generator, list) and len(generator) not in (1, batch):
        raise ValueError(
            f"got a list of {len(generator)} generators for {batch} images "
            "(prompts x num_images_per_prompt); pass one generator or one per image"
        )
    for g in gens:
        if g is None:
            continue
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(g).__name__}")
        if g.device.type != "cpu" and g.device.type != device.type:
            raise ValueError(
                f"a {g.device.type} generator cannot draw noise for a {device} pipeline; "
                "use a CPU generator or one on the pipeline's device"
            )


def _check_latents(latents: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents)
        raise ValueError(f"latents must have shape {shape}, got {got}")
    if not latents.is_floating_point() or not torch.isfinite(latents).all():
        raise ValueError("latents must be a finite floating-point tensor")


def parse_call(
    *,
    recipe: str,
    prior_sampler: Sampler,
    decoder_sampler: Sampler,
    prior_channels: int,
    device: torch.device,
    prompt: str | list[str],
    height: int | None,
    width: int | None,
    prior_num_inference_steps: int | None,
    prior_guidance_scale: float | None,
    num_inference_steps: int | None,
    decoder_guidance_scale: float | None,
    negative_prompt: str | list[str] | None,
    num_images_per_prompt: int,
    generator: GeneratorArg,
    latents: torch.Tensor | None,
    output_type: str,
) -> CallArgs:
    """The call's arguments with the recipe's defaults applied, every one checked."""
    d = DEFAULTS[recipe]
    height, width = _or(height, d["height"]), _or(width, d["width"])
    prior_steps = _or(prior_num_inference_steps, d["prior_num_inference_steps"])
    prior_g = _or(prior_guidance_scale, d["prior_guidance_scale"])
    steps = _or(num_inference_steps, d["num_inference_steps"])
    dec_g = _or(decoder_guidance_scale, d["decoder_guidance_scale"])
    prompts = _as_prompt_list(prompt, "prompt")
    negatives = None
    if negative_prompt is not None:
        negatives = _as_prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries but prompt has {len(prompts)}"
            )
    check_number("prior_num_inference_steps", prior_steps, integer=True, minimum=1)
    check_number("num_inference_steps", steps, integer=True, minimum=1)
    check_number("prior_guidance_scale", prior_g, integer=False, minimum=0)
    check_number("decoder_guidance_scale", dec_g, integer=False, minimum=0)
    check_number("num_images_per_prompt", num_images_per_prompt, integer=True, minimum=1)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    sizes = latent_sizes(height, width, recipe)
    batch = len(prompts) * num_images_per_prompt
    _check_generator(generator, batch, device)
    if latents is not None:
        _check_latents(latents, (batch, prior_channels, *sizes.stage_c))
    prior_guided = prior_sampler.guidance_enabled(prior_g)
    decoder_guided = decoder_sampler.guidance_enabled(dec_g)
    if not (prior_guided or decoder_guided):
        negatives = None
    elif negatives is None:
        negatives = [""] * len(prompts)
    return CallArgs(
        prompts=prompts,
        negatives=negatives,
        num_images_per_prompt=num_images_per_prompt,
        sizes=sizes,
        prior_steps=prior_steps,
        prior_guidance=prior_g,
        prior_guided=prior_guided,
        steps=steps,
        decoder_guidance=dec_g,
        decoder_guided=decoder_guided,
        generator=generator,
        latents=latents,
        output_type=output_type,
    )


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} was asked for but CUDA is not available here")
    return dev


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(names)}")
        return names[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    return dtype
