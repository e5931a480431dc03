"""Stage A: the Paella f4 VQGAN that maps RGB images to 4-channel latents and back (§5.1).

Parameter and buffer names are the official `stage_a.safetensors` keys; the diffusers
`PaellaVQModel` differs only in `vquantizer.embedding.weight` (ours: `vquantizer.codebook.weight`).
Activations run in `torch.channels_last`, so the per-pixel LayerNorm and MLP of each residual
block work on free [B, H, W, C] views.

The module applies no latent scaling and no clamping: the pipeline multiplies by
`config.scale_factor` (0.43 for the official weights, 0.3764 in the diffusers config) before
`decode` and clamps the images afterwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cascade_rt.ops import layernorm2d, vq_lookup

# Legacy argument names of the Stability `StageA` class, mapped to the diffusers names.
_LEGACY_NAMES = {
    "c_hidden": "embed_dim",
    "c_latent": "latent_channels",
    "codebook_size": "num_vq_embeddings",
}


@dataclass(frozen=True)
class StageAConfig:
    """Hyper-parameters with the diffusers `PaellaVQModel` config names (§5.1)."""

    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764

    def __post_init__(self) -> None:
        if self.levels < 1 or self.bottleneck_blocks < 1:
            raise ValueError(
                f"StageAConfig: levels ({self.levels}) and bottleneck_blocks "
                f"({self.bottleneck_blocks}) must be >= 1"
            )
        if self.embed_dim % (2 ** (self.levels - 1)) != 0:
            raise ValueError(
                f"StageAConfig: embed_dim {self.embed_dim} must be divisible by "
                f"2**(levels-1) = {2 ** (self.levels - 1)}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageAConfig:
        """From a diffusers vqgan `config.json` dict (or the Stability `StageA` argument names).

        Keys starting with "_" (`_class_name`, `_diffusers_version`, ...) are ignored; any other
        unknown key is an error.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in d.items():
            if key.startswith("_"):
                continue
            name = _LEGACY_NAMES.get(key, key)
            if name not in fields:
                unknown.append(key)
            else:
                kwargs[name] = value
        if unknown:
            raise ValueError(f"StageAConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**kwargs)

    @classmethod
    def from_shapes(
        cls, shapes: Mapping[str, Sequence[int]], scale_factor: float = 0.43
    ) -> StageAConfig:
        """Infer the architecture from checkpoint key -> shape (official or diffusers keys).

        Assumes RGB in and out (the released model); `scale_factor` is not stored in the weights.
        """
        try:
            c_in = shapes["in_block.1.weight"][1]
            levels = sum(1 for k in shapes if k.startswith("down_blocks.") and k.endswith("gammas"))
            up_blocks = sum(
                1 for k in shapes if k.startswith("up_blocks.") and k.endswith("gammas")
            )
            latent, embed_dim = shapes[f"down_blocks.{2 * levels - 1}.0.weight"][:2]
            book = shapes.get(
                "vquantizer.codebook.weight", shapes.get("vquantizer.embedding.weight")
            )
            if book is None:
                raise KeyError("vquantizer.codebook.weight")
        except (KeyError, ValueError) as e:
            raise ValueError(f"StageAConfig.from_shapes: not a Stage A checkpoint ({e})") from e
        return cls(
            up_down_scale_factor=round((c_in / 3) ** 0.5),
            levels=levels,
            bottleneck_blocks=up_blocks - (levels - 1),
            embed_dim=embed_dim,
            latent_channels=latent,
            num_vq_embeddings=book[0],
            scale_factor=scale_factor,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def c_levels(self) -> list[int]:
        """Channels per level, finest first: [embed_dim / 2**(levels-1), ..., embed_dim]."""
        return [self.embed_dim // 2**i for i in reversed(range(self.levels))]

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel along each axis (4 for the released model)."""
        return self.up_down_scale_factor * 2 ** (self.levels - 1)


# The diffusers `stabilityai/stable-cascade` vqgan/config.json.
STAGE_A = StageAConfig()
# Same architecture; the scale factor Stage B was trained with (official `stage_a.safetensors`).
STAGE_A_OFFICIAL = dataclasses.replace(STAGE_A, scale_factor=0.43)


class ResBlockA(nn.Module):
    """Paella mixing block: LN -> replicate-padded depthwise 3x3, LN -> MLP, six scalar gates.

    `gammas` = (scale1, shift1, gate1, scale2, shift2, gate2) over a LayerNorm without affine.
    """

    def __init__(self, c: int, c_hidden: int) -> None:
        super().__init__()
        # Module indices are part of the checkpoint keys: depthwise.1, channelwise.{0,2}.
        self.depthwise = nn.Sequential(
            nn.ReplicationPad2d(1), nn.Conv2d(c, c, kernel_size=3, groups=c)
        )
        self.channelwise = nn.Sequential(nn.Linear(c, c_hidden), nn.GELU(), nn.Linear(c_hidden, c))
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W] channels-last, so x.permute(0, 2, 3, 1) is a contiguous [B, H, W, C].
        g = self.gammas
        t = layernorm2d(x.permute(0, 2, 3, 1), post_scale=g[0], post_shift=g[1])  # [B, H, W, C]
        x = x + self.depthwise(t.permute(0, 3, 1, 2)) * g[2]
        t = layernorm2d(x.permute(0, 2, 3, 1), post_scale=g[3], post_shift=g[4])  # [B, H, W, C]
        return x + (self.channelwise(t) * g[5]).permute(0, 3, 1, 2)


class Codebook(nn.Module):
    """Holds the VQ codebook under the official key `vquantizer.codebook.weight` [K, D]."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.codebook = nn.Embedding(num_embeddings, dim)


class StageA(nn.Module):
    """Paella VQGAN (Stage A): `encode`, `quantize`, `decode`. Build on meta, then load weights."""

    def __init__(self, config: StageAConfig = STAGE_A_OFFICIAL) -> None:
        super().__init__()
        self.config = config
        cfg = config
        c = cfg.c_levels
        f = cfg.up_down_scale_factor
        self.in_block = nn.Sequential(
            nn.PixelUnshuffle(f), nn.Conv2d(cfg.in_channels * f * f, c[0], kernel_size=1)
        )
        down: list[nn.Module] = []
        for i in range(cfg.levels):
            if i > 0:
                down.append(nn.Conv2d(c[i - 1], c[i], kernel_size=4, stride=2, padding=1))
            down.append(ResBlockA(c[i], 4 * c[i]))
        down.append(
            nn.Sequential(
                nn.Conv2d(c[-1], cfg.latent_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(cfg.latent_channels),
            )
        )
        self.down_blocks = nn.Sequential(*down)
        self.vquantizer = Codebook(cfg.num_vq_embeddings, cfg.latent_channels)

        up: list[nn.Module] = [nn.Sequential(nn.Conv2d(cfg.latent_channels, c[-1], kernel_size=1))]
        for i in range(cfg.levels):
            ci = c[cfg.levels - 1 - i]
            up.extend(ResBlockA(ci, 4 * ci) for _ in range(cfg.bottleneck_blocks if i == 0 else 1))
            if i < cfg.levels - 1:
                up.append(nn.ConvTranspose2d(ci, c[cfg.levels - 2 - i], 4, stride=2, padding=1))
        self.up_blocks = nn.Sequential(*up)
        self.out_block = nn.Sequential(
            nn.Conv2d(c[0], cfg.out_channels * f * f, kernel_size=1), nn.PixelShuffle(f)
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> unscaled latents [B, 4, H/4, W/4] (channels-last).

        Equals diffusers `PaellaVQModel.encode(images).latents`; H and W must be multiples of 4.
        """
        cfg = self.config
        if images.dim() != 4 or images.shape[1] != cfg.in_channels:
            raise ValueError(
                f"StageA.encode: images must be [B, {cfg.in_channels}, H, W], "
                f"got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % cfg.downscale or w % cfg.downscale:
            raise ValueError(
                f"StageA.encode: image size {h}x{w} must be a multiple of {cfg.downscale}"
            )
        pixel_unshuffle, conv_in = self.in_block
        x = pixel_unshuffle(images).contiguous(memory_format=torch.channels_last)
        x = conv_in(x)  # [B, c0, H/2, W/2]
        *blocks, head = self.down_blocks
        for block in blocks:
            x = block(x)
        conv_out, bn = head
        x = conv_out(x)  # [B, 4, H/4, W/4]
        # Always the running statistics: this is an inference runtime, whatever the module mode.
        return F.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps
        )

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codebook vector per latent pixel (L2).

        latents [B, D, h, w] -> (quantized [B, D, h, w] channels-last, indices [B, h, w] int64).
        """
        codebook = self.vquantizer.codebook.weight  # [K, D]
        if latents.dim() != 4 or latents.shape[1] != codebook.shape[1]:
            raise ValueError(
                f"StageA.quantize: latents must be [B, {codebook.shape[1]}, h, w], "
                f"got {tuple(latents.shape)}"
            )
        b, d, h, w = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(b * h * w, d)  # [N, D]
        indices, quantized = vq_lookup(flat, codebook)
        return quantized.view(b, h, w, d).permute(0, 3, 1, 2), indices.view(b, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w] (already multiplied by scale_factor) -> images [B, 3, 4h, 4w].

        Equals diffusers `PaellaVQModel.decode(latents, force_not_quantize=True).sample`:
        no quantization, no scaling, no clamping. Returns a contiguous (NCHW) tensor.
        """
        cfg = self.config
        if latents.dim() != 4 or latents.shape[1] != cfg.latent_channels:
            raise ValueError(
                f"StageA.decode: latents must be [B, {cfg.latent_channels}, h, w], "
                f"got {tuple(latents.shape)}"
            )
        x = latents.contiguous(memory_format=torch.channels_last)
        x = self.up_blocks(x)  # [B, c0, 2h, 2w]
        return self.out_block(x).contiguous()
