"""Small random-weight cascades: the built-in `--random-weights tiny` model and test fixtures.

Weights are drawn away from the zero defaults that several layers start at (GRN gamma/beta,
Stage A gammas, output convolutions), so a wrong wiring cannot hide behind a zero, and Stage A's
output is biased towards mid-grey so decoded pixels stay mostly inside (0, 1) and the final
clamp hides nothing. Pictures from these weights are noise.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger("cascade_rt")

# Diffusers-style configs of the tiny cascade. Head dim stays 64 as in every released model.
TINY_TEXT_HIDDEN = 64
TINY_PRIOR_CONFIG: dict = {
    "in_channels": 16,
    "out_channels": 16,
    "timestep_ratio_embedding_dim": 64,
    "patch_size": 1,
    "conditioning_dim": 128,
    "block_out_channels": [128, 128],
    "num_attention_heads": [2, 2],
    "down_num_layers_per_block": [1, 2],
    "up_num_layers_per_block": [2, 1],
    "down_blocks_repeat_mappers": [1, 1],
    "up_blocks_repeat_mappers": [1, 1],
    "block_types_per_layer": [
        ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"],
        ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"],
    ],
    "clip_text_in_channels": TINY_TEXT_HIDDEN,
    "clip_text_pooled_in_channels": TINY_TEXT_HIDDEN,
    "clip_image_in_channels": 32,
    "clip_seq": 4,
    "effnet_in_channels": None,
    "pixel_mapper_in_channels": None,
    "kernel_size": 3,
    "dropout": [0.0, 0.0],
    "self_attn": True,
    "timestep_conditioning_type": ["sca", "crp"],
    "switch_level": [False],
}
TINY_DECODER_CONFIG: dict = {
    "in_channels": 4,
    "out_channels": 4,
    "timestep_ratio_embedding_dim": 64,
    "patch_size": 2,
    "conditioning_dim": 128,
    "block_out_channels": [32, 64, 128, 128],
    "num_attention_heads": [0, 0, 2, 2],
    "down_num_layers_per_block": [1, 1, 1, 1],
    "up_num_layers_per_block": [1, 1, 1, 1],
    "down_blocks_repeat_mappers": [1, 1, 1, 1],
    "up_blocks_repeat_mappers": [2, 2, 2, 1],
    "block_types_per_layer": [
        ["SDCascadeResBlock", "SDCascadeTimestepBlock"],
        ["SDCascadeResBlock", "SDCascadeTimestepBlock"],
        ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"],
        ["SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"],
    ],
    "clip_text_in_channels": None,
    "clip_text_pooled_in_channels": TINY_TEXT_HIDDEN,
    "clip_image_in_channels": None,
    "clip_seq": 4,
    "effnet_in_channels": 16,
    "pixel_mapper_in_channels": 3,
    "kernel_size": 3,
    "dropout": [0.0, 0.0, 0.0, 0.0],
    "self_attn": True,
    "timestep_conditioning_type": ["sca"],
    "switch_level": None,
}
TINY_VQGAN_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "up_down_scale_factor": 2,
    "levels": 2,
    "bottleneck_blocks": 2,
    "embed_dim": 64,
    "latent_channels": 4,
    "num_vq_embeddings": 64,
    "scale_factor": 0.3764,
}


# A random Stage B predicts noise badly, so its latents end ~100x larger than a trained one's
# (x0 = x / sqrt(alpha_cumprod) with alpha_cumprod(1) = 1e-4); Stage A's first decoder convolution
# is scaled down to match, and its last one gets small weights around a mid-grey bias
# (official key names).
STAGE_A_IN_WEIGHT = "up_blocks.0.0.weight"
STAGE_A_OUT_WEIGHT = "out_block.0.weight"
STAGE_A_OUT_BIAS = "out_block.0.bias"


def tiny_text_encoder_config(vocab_size: int) -> dict:
    """Hugging Face CLIPTextConfig dict for the tiny text encoder; ids follow the CLIP vocab rule
    (bos and eos are the last two ids, padding uses eos)."""
    return {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": TINY_TEXT_HIDDEN,
        "intermediate_size": 4 * TINY_TEXT_HIDDEN,
        "projection_dim": TINY_TEXT_HIDDEN,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def _fan_in(shape: torch.Size) -> int:
    return max(1, math.prod(shape[1:]))


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fills every parameter and buffer of `module` (on a real device) with seeded random values.

    Matrices and convolutions get N(0, 1/fan_in) so activations stay O(1); vectors (biases, GRN
    gamma/beta, Stage A gammas) get small non-zero values; LayerNorm weights sit near one;
    BatchNorm statistics are plausible. Stage A's output layer is steered towards mid-grey.
    """
    # Drawn where the module lives, so full-size models never pass through host memory.
    device = next(module.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device) * std

    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if not t.is_floating_point():
            value = torch.zeros(t.shape, dtype=t.dtype, device=device)
        elif leaf == "running_var":
            value = torch.rand(t.shape, generator=gen, device=device) + 0.5
        elif leaf == "running_mean":
            value = normal(t.shape, 0.1)
        elif leaf in ("gamma", "beta", "gammas"):
            value = normal(t.shape, 0.2)
        elif "norm" in name and leaf == "weight":
            value = 1.0 + normal(t.shape, 0.1)
        elif "embedding" in name and t.dim() == 2 and "mapper" not in name:
            value = normal(t.shape, 0.5)
        elif t.dim() >= 2:
            value = normal(t.shape, 1.0 / math.sqrt(_fan_in(t.shape)))
        else:
            value = normal(t.shape, 0.05)
        if name == STAGE_A_IN_WEIGHT:
            value = value * 0.01
        elif name == STAGE_A_OUT_WEIGHT:
            value = value * 0.1
        elif name == STAGE_A_OUT_BIAS:
            value = torch.full(t.shape, 0.5, device=device)
        t.copy_(value.to(t.dtype))
    return module


def _materialize(module: nn.Module, seed: int, device: torch.device, dtype: torch.dtype):
    # Cast on meta first so a full-size model is allocated once, in its run dtype.
    module = module.to(dtype=dtype).to_empty(device=device)
    return randomize_(module, seed).eval()


RANDOM_SIZES = ("tiny", "lite", "big")


def build_random_models(
    size: str, tokenizer_dir: Path, *, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> dict[str, object]:
    """A random-weight cascade in memory: tokenizer, text_encoder, prior, decoder, vqgan.

    "tiny" is the small test cascade; "lite" and "big" have the released architectures (Stage C
    1B / 3.6B, Stage B 0.7B / 1.5B, ViT-bigG text encoder, Stage A) for benchmarking without
    checkpoints. All use the tiny CLIP vocabulary written into `tokenizer_dir`.
    """
    from cascade_rt.models.fp16_rescale import rescale_for_fp16
    from cascade_rt.models.stage_a import STAGE_A, StageA, StageAConfig
    from cascade_rt.models.text_encoder import BIGG, CLIPTextConfig, CLIPTextEncoder
    from cascade_rt.models.tokenizer import CLIPTokenizer, write_tiny_clip_vocab
    from cascade_rt.models.unet import (
        STAGE_B,
        STAGE_B_LITE,
        STAGE_C,
        STAGE_C_LITE,
        StableCascadeUNet,
        UNetConfig,
    )

    if size not in RANDOM_SIZES:
        raise ValueError(f"unknown random-weight size {size!r}; choose from {RANDOM_SIZES}")
    write_tiny_clip_vocab(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_folder(tokenizer_dir)
    ids = tiny_text_encoder_config(tokenizer.vocab_size)
    if size == "tiny":
        te_config = CLIPTextConfig.from_dict(ids)
        configs = (
            UNetConfig.from_dict(TINY_PRIOR_CONFIG),
            UNetConfig.from_dict(TINY_DECODER_CONFIG),
            StageAConfig.from_dict(TINY_VQGAN_CONFIG),
        )
    else:
        te_config = dataclasses.replace(
            BIGG,
            vocab_size=ids["vocab_size"],
            bos_token_id=ids["bos_token_id"],
            eos_token_id=ids["eos_token_id"],
            pad_token_id=ids["pad_token_id"],
        )
        configs = (
            (STAGE_C_LITE, STAGE_B_LITE, STAGE_A) if size == "lite" else (STAGE_C, STAGE_B, STAGE_A)
        )
    with torch.device("meta"):
        text_encoder = CLIPTextEncoder(te_config)
        prior = StableCascadeUNet(configs[0])
        decoder = StableCascadeUNet(configs[1])
        vqgan = StageA(configs[2])
    prior = _materialize(prior, seed + 1, device, dtype)
    if dtype == torch.float16:  # as cascade_rt.loading does for checkpoints
        logger.info("prior: %s", rescale_for_fp16(prior).summary())
    return {
        "tokenizer": tokenizer,
        "text_encoder": _materialize(text_encoder, seed, device, dtype),
        "prior": prior,
        "decoder": _materialize(decoder, seed + 2, device, dtype),
        "vqgan": _materialize(vqgan, seed + 3, device, dtype),
    }
