"""The tiny random-weight cascade in diffusers form, and on disk in every supported layout.

Our models are built and randomised by cascade_rt.random_weights; the same weights are loaded
into diffusers / transformers modules (the numerical reference), assembled into diffusers'
pipelines, and written by their own save_pretrained, so the folders are exactly what users have.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cascade_rt.random_weights import (
    TINY_DECODER_CONFIG,
    TINY_PRIOR_CONFIG,
    TINY_VQGAN_CONFIG,
    build_random_models,
    tiny_text_encoder_config,
)
from cascade_rt.weights import write_component
from cascade_rt.weights.keymap import to_diffusers


@dataclass
class TinyCheckpoints:
    combined: Path  # StableCascadeCombinedPipeline.save_pretrained
    prior_repo: Path  # hub stable-cascade-prior layout (prior/, prior_lite/, text_encoder/, ...)
    decoder_repo: Path  # hub stable-cascade layout, plus the official single files at its root
    official: Path  # official single files only, beside text_encoder/ and tokenizer/
    pipe: object  # the diffusers StableCascadeCombinedPipeline holding the same weights
    ours: dict  # our in-memory models (float32, CPU)


def build_tiny_checkpoints(root: Path) -> TinyCheckpoints:
    from diffusers import (
        DDPMWuerstchenScheduler,
        StableCascadeCombinedPipeline,
        StableCascadeDecoderPipeline,
        StableCascadePriorPipeline,
        StableCascadeUNet,
    )
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizerFast

    tok_dir = root / "tokenizer_files"
    cpu = torch.device("cpu")
    ours = build_random_models("tiny", tok_dir, device=cpu, dtype=torch.float32, seed=1234)
    tokenizer = CLIPTokenizerFast.from_pretrained(tok_dir)
    te_cfg = tiny_text_encoder_config(ours["tokenizer"].vocab_size)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg)).eval()
    text_encoder.load_state_dict(ours["text_encoder"].state_dict(), strict=True)
    prior = StableCascadeUNet(**TINY_PRIOR_CONFIG).eval()
    prior.load_state_dict(to_diffusers("prior", ours["prior"].state_dict()), strict=True)
    decoder = StableCascadeUNet(**TINY_DECODER_CONFIG).eval()
    decoder.load_state_dict(to_diffusers("decoder", ours["decoder"].state_dict()), strict=True)
    vqgan = PaellaVQModel(**TINY_VQGAN_CONFIG).eval()
    vqgan.load_state_dict(to_diffusers("vqgan", ours["vqgan"].state_dict()), strict=True)

    pipe = StableCascadeCombinedPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan,
        prior_prior=prior,
        prior_text_encoder=text_encoder,
        prior_tokenizer=tokenizer,
        prior_scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    combined = root / "combined"
    pipe.save_pretrained(combined)

    prior_repo = root / "stable-cascade-prior"
    StableCascadePriorPipeline(
        prior=prior,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDPMWuerstchenScheduler(),
    ).save_pretrained(prior_repo)
    shutil.copytree(prior_repo / "prior", prior_repo / "prior_lite")

    decoder_repo = root / "stable-cascade"
    StableCascadeDecoderPipeline(
        decoder=decoder,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=vqgan,
    ).save_pretrained(decoder_repo)
    shutil.copytree(decoder_repo / "decoder", decoder_repo / "decoder_lite")
    # The official single files sit at the root of the same hub repo.
    official = root / "official"
    for folder in (decoder_repo, official):
        for component in ("prior", "decoder", "vqgan"):
            write_component(ours[component].state_dict(), component, folder, layout="official")
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(decoder_repo / sub, official / sub)
    return TinyCheckpoints(combined, prior_repo, decoder_repo, official, pipe, ours)
