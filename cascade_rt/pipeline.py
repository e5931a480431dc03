"""Cascade: text -> Stage C -> Stage B -> Stage A -> image, with diffusers' argument names.

`Cascade.from_pretrained` reads any supported checkpoint layout (cascade_rt/weights), and calling
the object takes the arguments of diffusers' StableCascadeCombinedPipeline, so porting is a
one-line change and, with the default recipe, the same weights and seed give the same image.
Stage math lives in cascade_rt/models, sampler math in cascade_rt/sampling; this module only
orchestrates: validate everything first, then encode text, run the two diffusion loops, decode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from cascade_rt.call_args import (
    RECIPES,
    CallArgs,
    check_number,
    parse_call,
    resolve_device,
    resolve_dtype,
)
from cascade_rt.loops import (
    LoopKey,
    SamplingLoop,
    decode_program,
    draw_loop_noise,
    loop_program,
    text_program,
)
from cascade_rt.memory import MemoryPlanner, StageWeights
from cascade_rt.memory.modes import check_request
from cascade_rt.runner import CacheInfo, Program, ProgramCache
from cascade_rt.sampling import GeneratorArg, Sampler, make_sampler

logger = logging.getLogger("cascade_rt")

STAGE_NAMES = {"prior": "Stage C", "decoder": "Stage B"}


@dataclass
class CascadeOutput:
    """What a call returns: `.images` as asked by output_type, plus per-stage wall times (ms)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Host time per stage to fill its static buffers and launch it (one graph replay on CUDA;
    # all of the work when eager), and "<stage>_noise": drawing that loop's noise beforehand
    # (on the host with a CPU generator, as diffusers draws it; a few launches with a CUDA one).
    host_ms: dict[str, float] = field(default_factory=dict)


class NonFiniteError(FloatingPointError):
    """A stage produced NaN or inf; raised after that stage, naming it."""


@dataclass
class PromptEmbeds:
    """Text conditioning, already repeated for num_images_per_prompt (cond and uncond rows)."""

    text: torch.Tensor  # [N, 77, C] hidden_states[-1] of the text encoder
    pooled: torch.Tensor  # [N, 1, P] projected EOS embedding
    uncond_text: torch.Tensor | None  # [N, 77, C] for the negative prompt, when guidance is on
    uncond_pooled: torch.Tensor | None  # [N, 1, P]


class Cascade:
    """The three-stage Stable Cascade pipeline on one device and dtype."""

    def __init__(
        self,
        *,
        tokenizer: Any,
        vqgan_scale_factor: float,
        text_encoder: torch.nn.Module | None = None,
        prior: torch.nn.Module | None = None,
        decoder: torch.nn.Module | None = None,
        vqgan: torch.nn.Module | None = None,
        prior_scheduler_config: dict | None = None,
        decoder_scheduler_config: dict | None = None,
        recipe: str = "diffusers",
        random_weights: bool = False,
        graphs: bool | None = None,
        graph_cache_size: int = 16,
        memory: str | MemoryPlanner = "resident",
        device: str | torch.device | None = None,
    ) -> None:
        """The four modules (loaded) and a memory mode, or `memory=` a `MemoryPlanner` that
        already holds them (`from_pretrained` builds one from the checkpoint files). `device`
        defaults to the prior's; modules elsewhere (e.g. on the CPU) are placed there."""
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
        if not isinstance(memory, MemoryPlanner):
            given = dict(text_encoder=text_encoder, prior=prior, decoder=decoder, vqgan=vqgan)
            if missing := [name for name, m in given.items() if m is None]:
                raise ValueError(f"Cascade needs the modules {missing} (or a MemoryPlanner)")
            dev = torch.device(device) if device is not None else next(prior.parameters()).device
            weights = {name: StageWeights.from_module(m) for name, m in given.items()}
            memory = MemoryPlanner(memory, dev, weights)
        elif any(m is not None for m in (text_encoder, prior, decoder, vqgan)):
            raise ValueError("give the modules or a MemoryPlanner holding them, not both")
        self.memory = memory
        self.tokenizer = tokenizer
        self.text_encoder = memory.modules["text_encoder"]
        self.prior = memory.modules["prior"]
        self.decoder = memory.modules["decoder"]
        self.vqgan = memory.modules["vqgan"]
        self.vqgan_scale_factor = float(vqgan_scale_factor)
        self.recipe = recipe
        self.random_weights = random_weights
        self.prior_sampler: Sampler = make_sampler(recipe, "prior", prior_scheduler_config)
        self.decoder_sampler: Sampler = make_sampler(recipe, "decoder", decoder_scheduler_config)
        self.device: torch.device = memory.device
        self.dtype: torch.dtype = self.prior.dtype
        self.progress = True
        # Text encoding, each sampling loop and the Stage A decode run as cached programs over
        # static buffers: CUDA graphs on CUDA (graphs=None), eager elsewhere.
        self.programs = ProgramCache(self.device, graphs=graphs, capacity=graph_cache_size)
        self.graphs = self.programs.graphs
        self._host_ms: dict[str, float] = {}  # of the current call, by stage

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        decoder_path: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        variant: str | None = None,
        prior_lite: bool = False,
        decoder_lite: bool = False,
        recipe: str = "diffusers",
        vqgan_scale_factor: float | None = None,
        graphs: bool | None = None,
        graph_cache_size: int = 16,
        memory: str = "auto",
    ) -> Cascade:
        """Loads a cascade from any supported layout (see cascade_rt/weights/layout.py).

        `path` holds the prior (and usually everything else); `decoder_path` is where Stage B and
        Stage A live when they are elsewhere (the two diffusers hub repos). device defaults to CUDA
        when present, dtype to bfloat16 on CUDA and float32 on CPU. `vqgan_scale_factor` overrides
        the checkpoint's latent scale (diffusers 0.3764, official Stage A 0.43). `graphs`
        (default: on for CUDA) runs every stage as a replayed CUDA graph; `graph_cache_size`
        bounds how many (shape, steps, guidance) variants stay captured. `memory` says where the
        weights live: "resident" (all on the device), "sequential" (only the running stage's),
        "streaming" (Stage B/C blocks stream through a few device buffers) or "auto" (picked
        from free memory; `memory_report()` says which and why).
        """
        from cascade_rt.loading import load_cascade_components

        parts = load_cascade_components(
            Path(path),
            decoder_path=Path(decoder_path) if decoder_path is not None else None,
            device=resolve_device(device),
            dtype=resolve_dtype(dtype, resolve_device(device)),
            variant=variant,
            prior_lite=prior_lite,
            decoder_lite=decoder_lite,
            memory=memory,
        )
        if vqgan_scale_factor is not None:
            parts["vqgan_scale_factor"] = vqgan_scale_factor
        return cls(**parts, recipe=recipe, graphs=graphs, graph_cache_size=graph_cache_size)

    @classmethod
    def from_random_weights(
        cls,
        size: str = "tiny",
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        seed: int = 0,
        recipe: str = "diffusers",
        graphs: bool | None = None,
        graph_cache_size: int = 16,
        memory: str = "resident",
    ) -> Cascade:
        """A built-in cascade with random weights: "tiny" (small, runs anywhere), or "lite" /
        "big" (the released architectures, for benchmarks). It runs the whole path; its
        pictures are noise. Outside the resident mode the weights are drawn on the CPU and the
        memory planner places them (`memory` as in `from_pretrained`)."""
        import tempfile

        from cascade_rt.random_weights import build_random_models

        check_request(memory)  # before minutes of drawing weights
        dev = resolve_device(device)
        build_on = dev if memory == "resident" else torch.device("cpu")
        with tempfile.TemporaryDirectory(prefix="cascade_rt_tok_") as tmp:
            parts = build_random_models(
                size, Path(tmp), device=build_on, dtype=resolve_dtype(dtype, dev), seed=seed
            )
        return cls(
            **parts,
            vqgan_scale_factor=parts["vqgan"].config.scale_factor,
            recipe=recipe,
            random_weights=True,
            graphs=graphs,
            graph_cache_size=graph_cache_size,
            memory=memory,
            device=dev,
        )

    # ------------------------------------------------------------------ stages
    @torch.inference_mode()
    def encode_prompt(
        self,
        prompt: list[str],
        negative_prompt: list[str] | None,
        num_images_per_prompt: int,
    ) -> PromptEmbeds:
        """CLIP conditioning as diffusers computes it (hidden_states[-1] and text_embeds)."""
        texts = prompt + (negative_prompt or [])
        tokens = self.tokenizer(texts)
        for text, cut in zip(texts, tokens.truncated, strict=True):
            if cut:
                logger.warning(
                    "The following part of your input was truncated because CLIP can only handle "
                    "sequences up to %d tokens: %r (prompt %r)",
                    tokens.input_ids.shape[1],
                    cut,
                    text,
                )
        shape = tuple(tokens.input_ids.shape)
        program = self.programs.get(
            ("text_encoder", shape),
            lambda: text_program(
                self.text_encoder, shape, self.device, graph=self.graphs, pool=self.programs.pool
            ),
        )
        out = self._run(
            "text_encoder",
            program,
            {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask},
        )
        hidden = out["hidden"].repeat_interleave(num_images_per_prompt, dim=0)  # [N, 77, C]
        pooled = out["pooled"].unsqueeze(1).repeat_interleave(num_images_per_prompt, dim=0)
        n = len(prompt) * num_images_per_prompt
        if negative_prompt is None:
            return PromptEmbeds(hidden, pooled, None, None)
        return PromptEmbeds(hidden[:n], pooled[:n], hidden[n:], pooled[n:])

    def _sample(
        self,
        stage: str,
        batch: int,
        size: tuple[int, int],
        steps: int,
        guidance_scale: float,
        cond: dict[str, torch.Tensor],
        generator: GeneratorArg,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One stage's sampling loop as a program run: the noise is drawn first, in the eager
        order, then the loop runs (or its graph replays) with no host work between steps. `cond`
        tensors already hold [cond; uncond] rows when guidance is on; `size` is the latent's
        (H, W) and `batch` its images."""
        model = self.prior if stage == "prior" else self.decoder
        sampler = self.prior_sampler if stage == "prior" else self.decoder_sampler
        shape = (batch, model.config.in_channels, *size)
        guided = sampler.guidance_enabled(guidance_scale)
        key = LoopKey(
            stage,
            shape,
            steps,
            guided,
            sampler,
            tuple((name, tuple(t.shape)) for name, t in cond.items()),
            self.dtype,
        )
        program = self.programs.get(
            key,
            lambda: loop_program(
                key, model, self.device, graph=self.graphs, pool=self.programs.pool
            ),
        )
        loop: SamplingLoop = program.body
        start = time.perf_counter()
        x, noise = draw_loop_noise(sampler, loop.plan, shape, generator, latents)
        values = loop.values(x, noise, guidance_scale, cond)
        self._host_ms[f"{stage}_noise"] = round((time.perf_counter() - start) * 1e3, 3)
        desc = STAGE_NAMES[stage]
        with tqdm(total=steps, desc=desc, disable=not self.progress, leave=False) as bar:
            loop.on_step = None if self.graphs else bar.update
            try:
                out = self._run(stage, program, values)
            finally:
                loop.on_step = None
            if self.graphs:
                bar.update(steps)
        if not bool(out["finite"]):  # one sync per stage, outside the loop
            raise NonFiniteError(
                f"{STAGE_NAMES[stage]} produced a non-finite latent (NaN or inf) of shape "
                f"{list(shape)} in {self.dtype}; "
                + (
                    "float16 overflows more easily: try bfloat16 or float32"
                    if self.dtype == torch.float16
                    else "check the weights and inputs"
                )
            )
        return out["latent"]

    # ------------------------------------------------------------------ call
    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        prior_num_inference_steps: int | None = None,
        prior_guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        decoder_guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
    ) -> CascadeOutput:
        """Generates images; argument names and defaults follow StableCascadeCombinedPipeline
        (with recipe="stability", the official notebooks' defaults). Everything is validated
        before any model runs."""
        args = parse_call(
            recipe=self.recipe,
            prior_sampler=self.prior_sampler,
            decoder_sampler=self.decoder_sampler,
            prior_channels=self.prior.config.in_channels,
            device=self.device,
            prompt=prompt,
            height=height,
            width=width,
            prior_num_inference_steps=prior_num_inference_steps,
            prior_guidance_scale=prior_guidance_scale,
            num_inference_steps=num_inference_steps,
            decoder_guidance_scale=decoder_guidance_scale,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            output_type=output_type,
        )
        return self._generate(args)

    def _generate(self, args: CallArgs) -> CascadeOutput:
        """Text -> Stage C -> Stage B -> Stage A for checked arguments."""
        n = args.batch
        timings: dict[str, float] = {}
        self._host_ms.clear()
        with _stage_time("text_encoder", self.device, timings):
            emb = self.encode_prompt(args.prompts, args.negatives, args.num_images_per_prompt)
        with _stage_time("prior", self.device, timings):
            image_embeddings = self._sample(
                "prior",
                n,
                args.sizes.stage_c,
                args.prior_steps,
                args.prior_guidance,
                self._prior_cond(emb, n, args.prior_guided),
                args.generator,
                args.latents,
            )
        with _stage_time("decoder", self.device, timings):
            stage_b = self._sample(
                "decoder",
                n,
                args.sizes.stage_b,
                args.steps,
                args.decoder_guidance,
                self._decoder_cond(emb, image_embeddings, args.decoder_guided),
                args.generator,
            )
        if args.output_type == "latent":
            latent = stage_b.clone() if self.graphs else stage_b
            return CascadeOutput(latent, timings, dict(self._host_ms))
        with _stage_time("vqgan", self.device, timings):
            images = self._decode(stage_b)  # static under graphs
            pt = args.output_type == "pt"
            result = _convert(images.clone() if pt else images, args.output_type)
        timings["total"] = sum(timings.values())
        return CascadeOutput(result, timings, dict(self._host_ms))

    def _decode(self, stage_b: torch.Tensor) -> torch.Tensor:
        """Stage A: Stage B latents -> images [B, 3, H, W] in [0, 1]."""
        shape = tuple(stage_b.shape)
        program = self.programs.get(
            ("vqgan", shape, self.dtype),
            lambda: decode_program(
                self.vqgan,
                self.vqgan_scale_factor,
                shape,
                self.dtype,
                self.device,
                graph=self.graphs,
                pool=self.programs.pool,
            ),
        )
        return self._run("vqgan", program, {"latents": stage_b})["images"]

    def _run(self, stage: str, program: Program, values: dict[str, torch.Tensor]):
        """Runs a stage's program with that stage's weights on the device (memory modes)."""
        with self.memory.use(stage):
            out = program.run(values)
        self._host_ms[stage] = round(program.host_ms, 3)
        return out

    def _prior_cond(self, emb: PromptEmbeds, n: int, guided: bool) -> dict[str, torch.Tensor]:
        c_img = self.prior.config.clip_image_in_channels
        clip_img = torch.zeros(n, 1, c_img, device=self.device, dtype=self.dtype)  # no image
        if not guided:
            return {"clip_text_pooled": emb.pooled, "clip_text": emb.text, "clip_img": clip_img}
        return {
            "clip_text_pooled": torch.cat([emb.pooled, emb.uncond_pooled]),
            "clip_text": torch.cat([emb.text, emb.uncond_text]),
            "clip_img": torch.cat([clip_img, clip_img]),
        }

    def _decoder_cond(
        self, emb: PromptEmbeds, image_embeddings: torch.Tensor, guided: bool
    ) -> dict[str, torch.Tensor]:
        if not guided:
            return {"clip_text_pooled": emb.pooled, "effnet": image_embeddings}
        return {
            "clip_text_pooled": torch.cat([emb.pooled, emb.uncond_pooled]),
            "effnet": torch.cat([image_embeddings, torch.zeros_like(image_embeddings)]),
        }

    def warmup(
        self, prompt_count: int = 1, batch: int | None = None, **call_kwargs: Any
    ) -> CascadeOutput:
        """Captures (on CUDA) every program a call with these arguments needs, ahead of time, by
        running one throwaway generation: for products that cannot pay a first-call capture.

        `prompt_count`, `batch` (images per prompt, i.e. `num_images_per_prompt`) and
        `call_kwargs` (height, width, steps, guidance scales, negative_prompt, ...) must match the
        later calls' shapes; guidance scales only need to agree on guided or not, and seeds do
        not matter.
        """
        check_number("prompt_count", prompt_count, integer=True, minimum=1)
        if batch is not None:
            if "num_images_per_prompt" in call_kwargs:
                raise ValueError("give batch or num_images_per_prompt, not both")
            call_kwargs["num_images_per_prompt"] = batch
        call_kwargs.setdefault("output_type", "pt")  # runs (captures) Stage A too
        return self([""] * prompt_count, **call_kwargs)

    def memory_report(self) -> dict:
        """Memory mode (and why, for "auto"), peak memory, weight bytes on the device and on the
        host, bytes copied for swapping or streaming and their time, per-stage placement."""
        return self.memory.report()

    def weight_bytes(self) -> int:
        """Bytes of all four stages' weights in the run dtype."""
        return sum(self.memory.stage_bytes.values())

    def graph_cache_info(self) -> CacheInfo:
        """Entries, bytes held (static buffers and capture growth), hits, misses, evictions."""
        return self.programs.info()

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """Turns the per-stage progress bars off or on (diffusers' method name)."""
        self.progress = not disable


@contextmanager
def _stage_time(name: str, device: torch.device, sink: dict[str, float]) -> Iterator[None]:
    """Wall time of a stage in ms into sink[name]; synchronises CUDA at its boundaries only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sink[name] = (time.perf_counter() - start) * 1e3


def _convert(images: torch.Tensor, output_type: str):
    """[B, 3, H, W] in [0, 1] -> the requested output type (diffusers' conversions)."""
    if output_type == "pt":
        return images
    arr = images.permute(0, 2, 3, 1).float().cpu().numpy()  # [B, H, W, 3]
    if output_type == "np":
        return arr
    return [Image.fromarray(img) for img in (arr * 255).round().astype("uint8")]
