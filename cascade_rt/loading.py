"""Builds every cascade component from a checkpoint location: configs, meta modules, weights.

Configs come from the diffusers `config.json` files, or are inferred from the tensor shapes of
the official single files (Stage A: architecture from shapes, latent scale 0.43 as in the
official code). Each module is built on the meta device and filled by `weights.load_module`,
which checks every key, shape and dtype before it allocates anything.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from cascade_rt.models.fp16_rescale import rescale_for_fp16
from cascade_rt.models.stage_a import StageA, StageAConfig
from cascade_rt.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from cascade_rt.models.tokenizer import CLIPTokenizer
from cascade_rt.models.unet import StableCascadeUNet, UNetConfig
from cascade_rt.weights import CheckpointError, Source, load_module, locate

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
) -> dict[str, Any]:
    """Keyword arguments for `Cascade(...)`: tokenizer, text_encoder, prior, decoder, vqgan,
    vqgan_scale_factor and the two scheduler configs.

    Every location is resolved and every header read before any weight is loaded, so a missing
    component fails fast.
    """
    dec_root = decoder_path if decoder_path is not None else path
    prior_src = locate(path, "prior", variant=variant, lite=prior_lite)
    decoder_src = locate(dec_root, "decoder", variant=variant, lite=decoder_lite)
    vqgan_src = locate(dec_root, "vqgan", variant=variant)
    te_src = locate(path, "text_encoder", variant=variant)
    tok_src = locate(path, "tokenizer")
    configs = {
        "prior": _unet_config(prior_src),
        "decoder": _unet_config(decoder_src),
        "vqgan": _stage_a_config(vqgan_src),
        "text_encoder": CLIPTextConfig.from_dict(te_src.config or {}),
    }
    if configs["prior"].is_decoder or not configs["decoder"].is_decoder:
        raise ValueError(
            f"{prior_src.folder} must hold Stage C (prior) and {decoder_src.folder} Stage B "
            "(decoder) weights"
        )
    with torch.device("meta"):
        modules = {
            "prior": StableCascadeUNet(configs["prior"]),
            "decoder": StableCascadeUNet(configs["decoder"]),
            "vqgan": StageA(configs["vqgan"]),
            "text_encoder": CLIPTextEncoder(configs["text_encoder"]),
        }
    sources = {
        "prior": prior_src,
        "decoder": decoder_src,
        "vqgan": vqgan_src,
        "text_encoder": te_src,
    }
    for name, module in modules.items():
        load_module(module, sources[name], device=device, dtype=dtype)
        module.eval()
    if dtype == torch.float16:  # the big Stage C's stream overflows fp16 without it
        logger.info("prior: %s", rescale_for_fp16(modules["prior"]).summary())
    return {
        "tokenizer": CLIPTokenizer.from_folder(tok_src.folder),
        **modules,
        "vqgan_scale_factor": configs["vqgan"].scale_factor,
        "prior_scheduler_config": _scheduler_config(path, variant),
        "decoder_scheduler_config": _scheduler_config(dec_root, variant),
    }
