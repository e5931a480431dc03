"""Builds every cascade component from a checkpoint location: configs, meta modules, weights.

Configs come from the diffusers `config.json` files, or are inferred from the tensor shapes of
the official single files (Stage A: architecture from shapes, latent scale 0.43 as in the
official code). Each module is built on the meta device; `weights.plan_load` checks every key,
shape and dtype before anything is allocated, and the memory planner (cascade_rt/memory) then
loads each stage where the memory mode puts it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cascade_rt.memory import MemoryPlanner, StageWeights, choose_mode
from cascade_rt.models.fp16_rescale import rescale_for_fp16
from cascade_rt.models.stage_a import StageA, StageAConfig
from cascade_rt.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from cascade_rt.models.tokenizer import CLIPTokenizer
from cascade_rt.models.unet import StableCascadeUNet, UNetConfig
from cascade_rt.weights import CheckpointError, Source, load_module, locate, plan_load

OFFICIAL_STAGE_A_SCALE = 0.43
logger = logging.getLogger("cascade_rt")


def _shapes(source: Source) -> dict[str, tuple[int, ...]]:
    return {name: info.shape for name, info in source.tensors.items()}


def _unet_config(source: Source) -> UNetConfig:
    if source.layout == "official" or source.config is None:
        return UNetConfig.from_official_keys(_shapes(source))
    return UNetConfig.from_dict(source.config)


def _stage_a_config(source: Source) -> StageAConfig:
    if source.layout == "official" or source.config is None:
        return StageAConfig.from_shapes(_shapes(source), scale_factor=OFFICIAL_STAGE_A_SCALE)
    return StageAConfig.from_dict(source.config)


def _scheduler_config(path: Path, variant: str | None) -> dict | None:
    """The folder's scheduler_config.json, or None (official files ship none: defaults apply)."""
    try:
        return locate(path, "scheduler", variant=variant).config
    except CheckpointError:
        return None


def load_cascade_components(
    path: Path,
    *,
    decoder_path: Path | None,
    device: torch.device,
    dtype: torch.dtype,
    variant: str | None,
    prior_lite: bool,
    decoder_lite: bool,
    memory: str = "resident",
) -> dict[str, Any]:
    """Keyword arguments for `Cascade(...)`: tokenizer, `memory` (a MemoryPlanner holding the
    four modules, placed as the memory mode says), vqgan_scale_factor and the two scheduler
    configs.

    Every location is resolved and every header checked before any weight is loaded, so a
    missing or mismatched component fails fast.
    """
    dec_root = decoder_path if decoder_path is not None else path
    sources = {
        "text_encoder": locate(path, "text_encoder", variant=variant),
        "prior": locate(path, "prior", variant=variant, lite=prior_lite),
        "decoder": locate(dec_root, "decoder", variant=variant, lite=decoder_lite),
        "vqgan": locate(dec_root, "vqgan", variant=variant),
    }
    tok_src = locate(path, "tokenizer")
    configs = {
        "text_encoder": CLIPTextConfig.from_dict(sources["text_encoder"].config or {}),
        "prior": _unet_config(sources["prior"]),
        "decoder": _unet_config(sources["decoder"]),
        "vqgan": _stage_a_config(sources["vqgan"]),
    }
    if configs["prior"].is_decoder or not configs["decoder"].is_decoder:
        raise ValueError(
            f"{sources['prior'].folder} must hold Stage C (prior) and "
            f"{sources['decoder'].folder} Stage B (decoder) weights"
        )
    with torch.device("meta"):
        modules = {
            "text_encoder": CLIPTextEncoder(configs["text_encoder"]),
            "prior": StableCascadeUNet(configs["prior"]),
            "decoder": StableCascadeUNet(configs["decoder"]),
            "vqgan": StageA(configs["vqgan"]),
        }
    plans = {name: plan_load(modules[name], sources[name], dtype) for name in modules}
    mode, why = choose_mode(memory, device, {name: p.nbytes for name, p in plans.items()})
    stages = {
        name: StageWeights(module, source=sources[name], dtype=dtype)
        for name, module in modules.items()
    }
    rescale = dtype == torch.float16  # the big Stage C's stream overflows fp16 without it
    if rescale and mode != "resident":
        # Swapped or streamed weights are re-copied from their host copy, so that copy must be
        # the rescaled one: load the prior on the CPU, rescale, and hand its tensors over.
        prior = modules["prior"]
        load_module(prior, sources["prior"], device=torch.device("cpu"), dtype=dtype)
        logger.info("prior: %s", rescale_for_fp16(prior).summary())
        stages["prior"] = StageWeights.from_module(prior)
    planner = MemoryPlanner(mode, device, stages, reason=why)
    if rescale and mode == "resident":
        logger.info("prior: %s", rescale_for_fp16(planner.modules["prior"]).summary())
    return {
        "tokenizer": CLIPTokenizer.from_folder(tok_src.folder),
        "memory": planner,
        "vqgan_scale_factor": configs["vqgan"].scale_factor,
        "prior_scheduler_config": _scheduler_config(path, variant),
        "decoder_scheduler_config": _scheduler_config(dec_root, variant),
    }
