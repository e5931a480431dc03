"""Stage C (prior) and Stage B (decoder): our equivalent of diffusers' StableCascadeUNet (§2-§4).

Parameter names are the official Stability single-file keys (design.md "Weights"): q/k/v fused
in `attention.attn.in_proj_weight` [3C, C], `attention.attn.out_proj`, and Stage B's pooled-text
mapper named `clip_mapper`. The config (`UNetConfig`, diffusers names) lives in unet_config.py.

The forward pass keeps activations channels-last and has no host syncs or value-dependent
branches, so it can be captured in a CUDA graph. What stays fixed over a generation's sampling
steps (the condition tokens' keys/values per attention block, Stage B's effnet/pixels stem term)
can be computed once with `prepare` and passed to `forward(..., conditions=...)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cascade_rt.models.unet_blocks import (
    RES,
    TIMESTEP,
    AttnBlock,
    Conv1x1,
    Conv2d,
    ConvTranspose2d,
    LayerNorm2d,
    Linear,
    ResBlock,
    TimestepBlock,
    UpDownBlock2d,
    channels_last,
    conv_mapper,
    resize,
)
from cascade_rt.models.unet_config import (
    STAGE_B,
    STAGE_B_LITE,
    STAGE_C,
    STAGE_C_LITE,
    UNetConfig,
)
from cascade_rt.ops import layernorm2d

__all__ = [
    "STAGE_B",
    "STAGE_B_LITE",
    "STAGE_C",
    "STAGE_C_LITE",
    "StableCascadeUNet",
    "UNetConditions",
    "UNetConfig",
]


@dataclass(frozen=True, eq=False)
class UNetConditions:
    """What stays fixed over a generation's sampling steps; built by `StableCascadeUNet.prepare`."""

    kv: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # by AttnBlock.index: k, v [B, Nc, nh, D]
    stem: torch.Tensor | None  # [B or 1, c0, h or 1, w or 1], added to the embedded sample
    batch: int
    latent_hw: tuple[int, int]  # (H, W) of the sample these were prepared for


def _next_attention(blocks: nn.ModuleList, k: int) -> bool:
    """Whether blocks[k] is directly followed by an AttnBlock, or by a TimestepBlock and then an
    AttnBlock (the shapes the fused attention norm absorbs)."""
    rest = list(blocks[k + 1 : k + 3])
    if rest and isinstance(rest[0], AttnBlock):
        return not isinstance(blocks[k], AttnBlock)
    return (
        isinstance(blocks[k], ResBlock)
        and len(rest) == 2
        and isinstance(rest[0], TimestepBlock)
        and isinstance(rest[1], AttnBlock)
    )


class StableCascadeUNet(nn.Module):
    """Stage C / Stage B UNet. Build on the meta device, then load weights (no init here)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        c, n, p = cfg.block_out_channels, cfg.num_levels, cfg.patch_size
        if cfg.effnet_in_channels is not None:
            self.effnet_mapper = conv_mapper(cfg.effnet_in_channels, c[0])
        if cfg.pixel_mapper_in_channels is not None:
            self.pixels_mapper = conv_mapper(cfg.pixel_mapper_in_channels, c[0])
        if cfg.clip_text_in_channels is not None:
            self.clip_txt_mapper = Linear(cfg.clip_text_in_channels, cfg.conditioning_dim)
        pooled = Linear(cfg.clip_text_pooled_in_channels, cfg.conditioning_dim * cfg.clip_seq)
        self.add_module(cfg.pooled_mapper_name, pooled)
        if cfg.clip_image_in_channels is not None:
            img = Linear(cfg.clip_image_in_channels, cfg.conditioning_dim * cfg.clip_seq)
            self.clip_img_mapper = img
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(p), Conv1x1(cfg.in_channels * p * p, c[0]), LayerNorm2d()
        )
        self.down_blocks, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        self.down_downscalers, self.up_upscalers = nn.ModuleList(), nn.ModuleList()
        self.down_repeat_mappers, self.up_repeat_mappers = nn.ModuleList(), nn.ModuleList()
        for i in range(n):
            self.down_downscalers.append(self._transition(i, "down") if i > 0 else nn.Identity())
            layers = range(cfg.down_num_layers_per_block[i])
            self.down_blocks.append(
                nn.ModuleList(
                    self._block(t, i) for _ in layers for t in cfg.block_types_per_layer[i]
                )
            )
            reps = range(cfg.down_blocks_repeat_mappers[i] - 1)
            self.down_repeat_mappers.append(nn.ModuleList(Conv1x1(c[i], c[i]) for _ in reps))
        for u, i in enumerate(reversed(range(n))):  # up path: deepest level first
            self.up_upscalers.append(self._transition(i, "up") if i > 0 else nn.Identity())
            blocks = nn.ModuleList()
            for j in range(cfg.up_num_layers_per_block[u]):
                for k, t in enumerate(cfg.block_types_per_layer[i]):
                    # only a level's first block takes the skip from the down path
                    c_skip = c[i] if i < n - 1 and j == k == 0 else 0
                    blocks.append(self._block(t, i, c_skip))
            self.up_blocks.append(blocks)
            reps = range(cfg.up_blocks_repeat_mappers[u] - 1)
            self.up_repeat_mappers.append(nn.ModuleList(Conv1x1(c[i], c[i]) for _ in reps))
        self.clf = nn.Sequential(
            LayerNorm2d(), Conv1x1(c[0], cfg.out_channels * p * p), nn.PixelShuffle(p)
        )
        # A plain tuple (not registered twice) in the order `UNetConditions.kv` uses.
        self._attn_blocks = tuple(m for m in self.modules() if isinstance(m, AttnBlock))
        for index, block in enumerate(self._attn_blocks):
            block.index = index

    def _block(self, kind: str, level: int, c_skip: int = 0) -> nn.Module:
        cfg, c = self.config, self.config.block_out_channels[level]
        if kind == RES:
            return ResBlock(c, c_skip, cfg.kernel_size)
        if kind == TIMESTEP:
            return TimestepBlock(
                c, cfg.timestep_ratio_embedding_dim, cfg.timestep_conditioning_type
            )
        heads = cfg.num_attention_heads[level]
        return AttnBlock(c, cfg.conditioning_dim, heads, cfg.level_self_attn(level))

    def _transition(self, level: int, mode: str) -> nn.Sequential:
        """LayerNorm2d + resampling conv between `level - 1` and `level`."""
        cfg, c = self.config, self.config.block_out_channels
        c_in, c_out = (c[level - 1], c[level]) if mode == "down" else (c[level], c[level - 1])
        if cfg.switch_level is not None:  # Stage C: 1x1 conv, bilinear resample if switched on
            conv: nn.Module = UpDownBlock2d(c_in, c_out, mode, cfg.switch_level[level - 1])
        elif mode == "down":  # Stage B: 2x2 patchify / un-patchify convolutions
            conv = Conv2d(c_in, c_out, kernel_size=2, stride=2)
        else:
            conv = ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
        return nn.Sequential(LayerNorm2d(), conv)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding[1].weight.device

    # ---------------------------------------------------------------- inputs
    def _check(
        self,
        name: str,
        t: torch.Tensor | None,
        ndims: tuple[int, ...],
        layout: str,
        channels: int | None = None,
        batch: int | None = None,
    ) -> None:
        """Shape/device checks only (no values read), cheap enough to run on every call."""
        if t is None:
            return
        where = f"StableCascadeUNet: {name}"
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{where} must be a floating-point tensor {layout}")
        if t.dim() not in ndims:
            raise ValueError(f"{where} must be {layout}, got shape {tuple(t.shape)}")
        channel_dim = 1 if t.dim() == 4 else -1
        if channels is not None and t.shape[channel_dim] != channels:
            raise ValueError(
                f"{where} must be {layout} with {channels} channels, got shape {tuple(t.shape)}"
            )
        if batch is not None and t.dim() > 0 and t.shape[0] != batch:
            raise ValueError(f"{where} has batch {t.shape[0]}, expected {batch}")
        if t.device != self.device:
            raise ValueError(f"{where} is on {t.device}, the model on {self.device}")

    def _check_conditioning(
        self,
        clip_text_pooled: torch.Tensor,
        clip_text: torch.Tensor | None,
        clip_img: torch.Tensor | None,
        effnet: torch.Tensor | None,
        pixels: torch.Tensor | None,
    ) -> int:
        cfg = self.config
        self._check(
            "clip_text_pooled",
            clip_text_pooled,
            (3,),
            "[B, N, C]",
            cfg.clip_text_pooled_in_channels,
        )
        b = clip_text_pooled.shape[0]
        unused = [
            name
            for name, t, used in (
                ("clip_text", clip_text, cfg.clip_text_in_channels),
                ("clip_img", clip_img, cfg.clip_image_in_channels),
                ("effnet", effnet, cfg.effnet_in_channels),
                ("pixels", pixels, cfg.pixel_mapper_in_channels),
            )
            if t is not None and used is None
        ]
        if unused:
            raise ValueError(f"StableCascadeUNet: this model takes no {', '.join(unused)} input")
        if (clip_text is None) != (clip_img is None):
            # diffusers would silently drop the one given; the prior needs both
            raise ValueError("StableCascadeUNet: give clip_text and clip_img together (or neither)")
        self._check("clip_text", clip_text, (3,), "[B, T, C]", cfg.clip_text_in_channels, b)
        self._check(
            "clip_img", clip_img, (2, 3), "[B, C] or [B, N, C]", cfg.clip_image_in_channels, b
        )
        self._check("effnet", effnet, (4,), "[B, C, h, w]", cfg.effnet_in_channels, b)
        self._check("pixels", pixels, (4,), "[B, C, h, w]", cfg.pixel_mapper_in_channels, b)
        return b

    # ---------------------------------------------------------------- conditioning
    def prepare(
        self,
        latent_hw: tuple[int, int],
        clip_text_pooled: torch.Tensor,
        clip_text: torch.Tensor | None = None,
        clip_img: torch.Tensor | None = None,
        effnet: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
    ) -> UNetConditions:
        """Everything `forward` derives from the conditioning inputs, for a sample of size
        `latent_hw` (H, W). Constant over sampling steps: compute once per generation."""
        cfg, dtype = self.config, self.dtype
        b = self._check_conditioning(clip_text_pooled, clip_text, clip_img, effnet, pixels)
        h, w = latent_hw[0] // cfg.patch_size, latent_hw[1] // cfg.patch_size
        pooled = getattr(self, cfg.pooled_mapper_name)(clip_text_pooled.to(dtype))
        tokens = pooled.view(b, -1, cfg.conditioning_dim)  # [B, N * clip_seq, c_cond]
        if clip_text is not None:
            img = clip_img if clip_img.dim() == 3 else clip_img[:, None]
            img = self.clip_img_mapper(img.to(dtype)).view(b, -1, cfg.conditioning_dim)
            text = self.clip_txt_mapper(clip_text.to(dtype))  # [B, T, c_cond]
            tokens = torch.cat([text, tokens, img], dim=1)  # order of §3.2: text, pooled, image
        cond = layernorm2d(tokens)  # [B, Nc, c_cond]
        kv = tuple(block.cond_kv(cond) for block in self._attn_blocks)
        stem = None
        if effnet is not None:
            stem = self.effnet_mapper(resize(effnet.to(dtype), (h, w)))  # [B, c0, h, w]
        if cfg.pixel_mapper_in_channels is not None:
            if pixels is None:
                # diffusers' default is an all-zero 8x8 picture: its mapped value is one vector
                # everywhere, which bilinear resizing keeps, so map a single zero pixel.
                zero = torch.zeros(
                    1, cfg.pixel_mapper_in_channels, 1, 1, device=self.device, dtype=dtype
                )
                term = self.pixels_mapper(zero)  # [1, c0, 1, 1]
            else:
                term = resize(self.pixels_mapper(pixels.to(dtype)), (h, w))  # [B, c0, h, w]
            stem = term if stem is None else stem + term
        return UNetConditions(kv, stem, b, (int(latent_hw[0]), int(latent_hw[1])))

    def r_embedding(
        self,
        timestep_ratio: torch.Tensor,
        batch: int,
        sca: torch.Tensor | None = None,
        crp: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sinusoidal embeddings of r and each t_cond, in fp32 (§6): [B, c_r * (1 + n_conds)].

        t_conds not given (and any other than sca/crp) embed zero, as in diffusers.
        """
        given = {"sca": sca, "crp": crp}
        values = [timestep_ratio] + [given.get(n) for n in self.config.timestep_conditioning_type]
        zero = torch.zeros(batch, device=timestep_ratio.device)
        parts = [
            self._sinusoid(zero if v is None else v.float().reshape(-1).expand(batch))
            for v in values
        ]
        return torch.cat(parts, dim=1)

    def _sinusoid(self, r: torch.Tensor) -> torch.Tensor:
        # r: [B] fp32 -> [B, c_r]
        c_r = self.config.timestep_ratio_embedding_dim
        half = c_r // 2
        freq = torch.arange(half, device=r.device, dtype=torch.float32)
        freq = freq.mul(-math.log(10000) / (half - 1)).exp()  # [half]
        angle = (r * 10000)[:, None] * freq[None, :]  # [B, half]
        emb = torch.cat([angle.sin(), angle.cos()], dim=1)
        return F.pad(emb, (0, 1)) if c_r % 2 else emb

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        sample: torch.Tensor,
        timestep_ratio: torch.Tensor,
        clip_text_pooled: torch.Tensor | None = None,
        clip_text: torch.Tensor | None = None,
        clip_img: torch.Tensor | None = None,
        effnet: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        sca: torch.Tensor | None = None,
        crp: torch.Tensor | None = None,
        *,
        conditions: UNetConditions | None = None,
    ) -> torch.Tensor:
        """Predicted noise [B, C_out, H, W] for sample [B, C_in, H, W] at noise level r [B].

        Arguments as in diffusers' StableCascadeUNet.forward: clip_text_pooled [B, N, C],
        clip_text [B, T, C], clip_img [B, C] or [B, N, C], effnet [B, C, h, w], pixels
        [B, 3, h, w] (zeros when None), sca/crp [B] (zero when None). Instead of the
        conditioning inputs, `conditions` from `prepare` may be given.
        """
        cfg = self.config
        self._check("sample", sample, (4,), "[B, C, H, W]", cfg.in_channels)
        b, _, height, width = sample.shape
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"StableCascadeUNet: sample size {height}x{width} is not a multiple of "
                f"patch_size {cfg.patch_size}"
            )
        self._check("timestep_ratio", timestep_ratio, (0, 1), "[B] or [1]")
        for name, t in (("timestep_ratio", timestep_ratio), ("sca", sca), ("crp", crp)):
            if t is None:
                continue
            if name != "timestep_ratio" and name not in cfg.timestep_conditioning_type:
                raise ValueError(f"StableCascadeUNet: this model has no {name} conditioning")
            self._check(name, t, (0, 1), "[B] or [1]")
            if t.numel() not in (1, b):
                raise ValueError(f"StableCascadeUNet: {name} has {t.numel()} values for batch {b}")
        inputs = (clip_text_pooled, clip_text, clip_img, effnet, pixels)
        if conditions is None:
            if clip_text_pooled is None:
                raise ValueError("StableCascadeUNet: clip_text_pooled (or conditions) is required")
            conditions = self.prepare((height, width), *inputs)
        elif any(t is not None for t in inputs):
            raise ValueError("StableCascadeUNet: give conditions or conditioning inputs, not both")
        if conditions.batch != b or conditions.latent_hw != (height, width):
            raise ValueError(
                f"StableCascadeUNet: conditions were prepared for batch {conditions.batch} at "
                f"{conditions.latent_hw}, the sample is batch {b} at {(height, width)}"
            )

        dtype = self.dtype
        r_embed = self.r_embedding(timestep_ratio, b, sca, crp).to(dtype)
        x = self.embedding(sample.to(dtype))  # [B, c0, H/p, W/p] channels-last
        if conditions.stem is not None:
            x = channels_last(x + conditions.stem)
        levels = self._down(x, r_embed, conditions.kv)
        x = self._up(levels, r_embed, conditions.kv)
        return self.clf(x)  # [B, C_out, H, W]

    def _run_blocks(
        self,
        blocks: nn.ModuleList,
        x: torch.Tensor,
        r_embed: torch.Tensor,
        kv: tuple[tuple[torch.Tensor, torch.Tensor], ...],
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One pass over a level's blocks; `skip` enters the first ResBlock.

        Where an AttnBlock follows, the blocks before it hand their last elementwise step to its
        LayerNorm instead of making their own pass over the activations: a ResBlock its residual
        add, a TimestepBlock its modulation (one fused `layernorm2d` for C-T-A).
        """
        modulation = residual = None
        for k, block in enumerate(blocks):
            feeds_attention = _next_attention(blocks, k)
            if isinstance(block, ResBlock):
                block_skip = skip if k == 0 else None
                if feeds_attention:
                    residual, x = x, block.branch(x, block_skip)
                else:
                    x = block(x, block_skip)
            elif isinstance(block, TimestepBlock):
                if feeds_attention:
                    modulation = block.modulation(r_embed)
                else:
                    x = block(x, r_embed)
            else:
                x = block(x, *kv[block.index], modulation=modulation, residual=residual)
                modulation = residual = None
        return x

    def _down(self, x: torch.Tensor, r_embed: torch.Tensor, kv) -> list[torch.Tensor]:
        """Down path; returns each level's output, deepest first."""
        levels: list[torch.Tensor] = []
        for blocks, downscaler, mappers in zip(
            self.down_blocks, self.down_downscalers, self.down_repeat_mappers, strict=True
        ):
            x = downscaler(x)
            for rep in range(len(mappers) + 1):
                x = self._run_blocks(blocks, x, r_embed, kv)
                if rep < len(mappers):
                    x = mappers[rep](x)
            levels.insert(0, x)
        return levels

    def _up(self, levels: list[torch.Tensor], r_embed: torch.Tensor, kv) -> torch.Tensor:
        """Up path, deepest level first; each level's skip re-enters on every repeat (§4.1)."""
        x = levels[0]
        for i, (blocks, upscaler, mappers) in enumerate(
            zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers, strict=True)
        ):
            for rep in range(len(mappers) + 1):
                skip = None
                if i > 0 and isinstance(blocks[0], ResBlock):
                    skip = levels[i]
                    if x.shape[-2:] != skip.shape[-2:]:  # odd sizes lost a row/column
                        x = resize(x, tuple(skip.shape[-2:]))
                x = self._run_blocks(blocks, x, r_embed, kv, skip)
                if rep < len(mappers):
                    x = mappers[rep](x)
            x = upscaler(x)
        return x
