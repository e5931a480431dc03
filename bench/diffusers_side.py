"""Diffusers' side of the pipeline benchmark: the same random weights in diffusers' pipeline.

    python bench/diffusers_side.py    # CPU check: tiny cascade, both pipelines, image diff

`build_diffusers_pipeline` builds our `Cascade.from_random_weights(size, ...)` first, then builds
diffusers' / transformers' modules on the meta device and assigns our tensors to them
(`load_state_dict(assign=True)`; diffusers' separate to_q/to_k/to_v are row views of our fused
in_proj), so both pipelines share one copy of the weights: "big" (3.6B + 1.5B + text encoder)
is held once. `time_diffusers` times diffusers' prior pipeline (text encode + Stage C), decoder
pipeline (text encode + Stage B, output_type="latent") and the VQGAN decode separately.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cascade_rt.pipeline import Cascade
from cascade_rt.weights.keymap import to_diffusers


def _assign(module_factory: Callable[[], nn.Module], state: Mapping[str, torch.Tensor], who: str):
    """Builds a module on meta and makes our tensors its parameters (no copy, no second
    allocation). Every key must match; buffers the state dict does not carry (transformers'
    non-persistent position_ids) are the only ones rebuilt, from the module's own definition."""
    with torch.device("meta"):
        module = module_factory()
    module.load_state_dict(state, strict=True, assign=True)
    device = next(iter(state.values())).device
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise ValueError(f"{who}: buffer {name!r} is not in the state dict")
            owner = module.get_submodule(name.rpartition(".")[0])
            owner.register_buffer(
                "position_ids",
                torch.arange(buf.shape[-1], device=device).expand(buf.shape),
                persistent=False,
            )
    leftover = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    if leftover:
        raise ValueError(f"{who}: tensors still on meta after loading: {leftover[:5]}")
    return module.eval()


def build_diffusers_pipeline(
    size: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[Any, Cascade]:
    """(diffusers StableCascadeCombinedPipeline, our Cascade), holding the same weights: exactly
    those of `Cascade.from_random_weights(size, device=device, dtype=dtype, seed=seed)`.

    The weights are shared, not copied; both pipelines are for inference only.
    """
    from diffusers import (
        DDPMWuerstchenScheduler,
        StableCascadeCombinedPipeline,
        StableCascadeUNet,
    )
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizerFast

    from cascade_rt.models.tokenizer import write_tiny_clip_vocab

    ours = Cascade.from_random_weights(size, device=device, dtype=dtype, seed=seed)
    with tempfile.TemporaryDirectory(prefix="cascade_rt_tok_") as tmp:
        # The same tiny vocabulary Cascade.from_random_weights tokenises with.
        write_tiny_clip_vocab(Path(tmp))
        tokenizer = CLIPTokenizerFast.from_pretrained(tmp)
    te_config = CLIPTextConfig(**ours.text_encoder.config.to_dict())
    text_encoder = _assign(
        lambda: CLIPTextModelWithProjection(te_config),
        ours.text_encoder.state_dict(),
        "text_encoder",
    )
    unets = {}
    for component in ("prior", "decoder"):
        model = getattr(ours, component)
        kwargs = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
        unets[component] = _assign(
            lambda kwargs=kwargs: StableCascadeUNet(**kwargs),
            to_diffusers(component, model.state_dict()),
            component,
        )
    vq_kwargs = ours.vqgan.config.to_dict()
    vqgan = _assign(
        lambda: PaellaVQModel(**vq_kwargs), to_diffusers("vqgan", ours.vqgan.state_dict()), "vqgan"
    )
    pipe = StableCascadeCombinedPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        decoder=unets["decoder"],
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan,
        prior_prior=unets["prior"],
        prior_text_encoder=text_encoder,
        prior_tokenizer=tokenizer,
        prior_scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, ours


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compile_unets(pipe: Any, mode: str | None) -> None:
    """torch.compile both UNets in place (idempotent: a compiled module is left alone)."""
    for sub in (pipe.prior_pipe, pipe.decoder_pipe):
        name = "prior" if sub is pipe.prior_pipe else "decoder"
        unet = getattr(sub, name)
        if not isinstance(unet, torch._dynamo.eval_frame.OptimizedModule):
            setattr(sub, name, torch.compile(unet, mode=mode))


@torch.inference_mode()
def _run_once(pipe: Any, args: dict, device: torch.device) -> tuple[dict[str, float], torch.Tensor]:
    """One generation, stage by stage as StableCascadeCombinedPipeline runs it. ms per stage."""
    t = {}
    generator = torch.Generator().manual_seed(args["seed"])  # one stream for both, as combined
    _sync(device)
    start = time.perf_counter()
    prior = pipe.prior_pipe(
        prompt=args["prompt"],
        height=args["height"],
        width=args["width"],
        num_inference_steps=args["prior_steps"],
        guidance_scale=args["prior_guidance"],
        num_images_per_prompt=args["batch"],
        generator=generator,
        output_type="pt",
    )
    _sync(device)
    t["prior"] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    latents = pipe.decoder_pipe(
        image_embeddings=prior.image_embeddings,
        num_inference_steps=args["steps"],
        guidance_scale=args["decoder_guidance"],
        prompt_embeds=prior.prompt_embeds,
        prompt_embeds_pooled=prior.prompt_embeds_pooled,
        negative_prompt_embeds=prior.negative_prompt_embeds,
        negative_prompt_embeds_pooled=prior.negative_prompt_embeds_pooled,
        generator=generator,
        output_type="latent",
    ).images
    _sync(device)
    t["decoder"] = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    vqgan = pipe.decoder_pipe.vqgan
    # The decoder pipeline's own last step (diffusers pipeline_stable_cascade.py, output "pt").
    images = vqgan.decode(vqgan.config.scale_factor * latents).sample.clamp(0, 1)
    _sync(device)
    t["vqgan"] = (time.perf_counter() - start) * 1e3
    t["total"] = t["prior"] + t["decoder"] + t["vqgan"]
    return t, images  # images: [batch, 3, height, width] in [0, 1]


def time_diffusers(
    pipe: Any,
    *,
    prompt: str,
    height: int,
    width: int,
    prior_steps: int,
    steps: int,
    prior_guidance: float,
    decoder_guidance: float,
    batch: int,
    compile: bool,
    warmup: int = 1,
    iters: int = 3,
    seed: int = 0,
    compile_mode: str | None = "max-autotune-no-cudagraphs",
) -> dict:
    """Times diffusers' pipeline: per-stage ms (median over `iters` after `warmup` runs),
    total ms and images/s; `compile=True` torch.compiles both UNets first (the warm-up runs
    pay the compilation). Stages: "prior" (prior pipeline: prompt encode + Stage C),
    "decoder" (decoder pipeline, prompt embeds from the prior: Stage B to latents), "vqgan"
    (Stage A decode). `batch` images come from one prompt (num_images_per_prompt)."""
    device = pipe.prior_pipe.prior.device
    if compile:
        _compile_unets(pipe, compile_mode)
    args = dict(
        prompt=prompt,
        height=height,
        width=width,
        prior_steps=prior_steps,
        steps=steps,
        prior_guidance=prior_guidance,
        decoder_guidance=decoder_guidance,
        batch=batch,
        seed=seed,
    )
    for _ in range(warmup):
        _run_once(pipe, args, device)
    runs = [_run_once(pipe, args, device)[0] for _ in range(max(1, iters))]
    stages = {k: statistics.median(r[k] for r in runs) for k in ("prior", "decoder", "vqgan")}
    total = statistics.median(r["total"] for r in runs)
    return {
        "backend": "diffusers" + (f"+compile({compile_mode})" if compile else ""),
        "stages_ms": {k: round(v, 2) for k, v in stages.items()},
        "total_ms": round(total, 2),
        "images_per_s": round(batch / (total / 1e3), 4),
        "iters": len(runs),
        "device": str(device),
        "dtype": str(pipe.prior_pipe.prior.dtype).removeprefix("torch."),
    }


def _cpu_check() -> None:
    """Tiny cascade on CPU: both pipelines run and give the same image."""
    kwargs = dict(
        prompt="a photo of a cat",
        height=256,
        width=256,
        prior_steps=3,
        steps=3,
        prior_guidance=4.0,
        decoder_guidance=0.0,
        batch=1,
    )
    pipe, ours = build_diffusers_pipeline("tiny", "cpu", torch.float32, seed=0)
    call = dict(  # the same settings under the pipelines' argument names
        prompt=kwargs["prompt"],
        height=kwargs["height"],
        width=kwargs["width"],
        prior_num_inference_steps=kwargs["prior_steps"],
        num_inference_steps=kwargs["steps"],
        prior_guidance_scale=kwargs["prior_guidance"],
        decoder_guidance_scale=kwargs["decoder_guidance"],
        output_type="pt",
    )
    ref = pipe(**call, generator=torch.Generator().manual_seed(5)).images
    got = ours(**call, generator=torch.Generator().manual_seed(5)).images
    staged = _run_once(pipe, dict(kwargs, seed=5), torch.device("cpu"))[1]
    print(f"tiny 256x256, 3+3 steps: max |ours - diffusers| = {(got - ref).abs().max().item():.3g}")
    print(f"stage-by-stage timing path vs combined call: {(staged - ref).abs().max().item():.3g}")
    print("diffusers timing:", time_diffusers(pipe, **kwargs, compile=False, warmup=1, iters=2))


if __name__ == "__main__":
    _cpu_check()
