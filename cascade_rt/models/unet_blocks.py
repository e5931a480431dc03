"""Blocks of the Stage B / Stage C UNet (ARCHITECTURE §2), with the official parameter names.

Attribute names and `nn.Sequential` slot indices are part of the checkpoint keys
(`channelwise.2.gamma`, `kv_mapper.1.weight`, `attention.attn.in_proj_weight`, ...), so slots that
hold no weights (GELU, dropout, LayerNorm2d, resampling) stay in place as parameter-free modules.

Every block takes and returns NCHW-shaped activations in `torch.channels_last` memory, so
`nhwc(x)` is a free, contiguous [B, H, W, C] view; per-pixel work (LayerNorm2d, GELU+GRN,
attention) runs through `cascade_rt.ops` on those views. Dropout is inference-off and never
applied. Layers skip their random init: weights come from a checkpoint or from
`cascade_rt.random_weights`, and the model is normally built on the meta device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cascade_rt.ops import attention, grn_gelu, layernorm2d

RES = "SDCascadeResBlock"
TIMESTEP = "SDCascadeTimestepBlock"
ATTN = "SDCascadeAttnBlock"
BLOCK_TYPES = (RES, TIMESTEP, ATTN)


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] channels-last -> [B, H, W, C] contiguous view."""
    return x.permute(0, 2, 3, 1)


def nchw(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] contiguous -> [B, C, H, W] channels-last view."""
    return x.permute(0, 3, 1, 2)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """No-op when x is already channels-last (as conv and resampling outputs normally are)."""
    return x.contiguous(memory_format=torch.channels_last)


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True, computed in fp32 as the official code does (§13.7)."""
    y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=True)
    return channels_last(y.to(x.dtype))


class Linear(nn.Linear):
    """nn.Linear without random init (weights are loaded or randomized elsewhere)."""

    def reset_parameters(self) -> None:
        return None


class Conv2d(nn.Conv2d):
    """nn.Conv2d without random init; output kept channels-last."""

    def reset_parameters(self) -> None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channels_last(super().forward(x))


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d without random init; output kept channels-last."""

    def reset_parameters(self) -> None:
        return None

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return channels_last(super().forward(x, output_size))


class Conv1x1(Conv2d):
    """1x1 convolution as one GEMM over the channels-last pixels (weight [C_out, C_in, 1, 1])."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, H, W] -> [B, C_out, H, W] channels-last
        return nchw(F.linear(nhwc(x), self.weight.flatten(1), self.bias))


class LayerNorm2d(nn.Module):
    """LayerNorm over channels, no affine (parameter-free).

    `eps` is 1e-6 as in the checkpoints; cascade_rt.models.fp16_rescale sets eps * s^2 on the
    norms that read a residual stream it scaled by s, so that LN(s * x) equals LN(x) exactly.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nchw(layernorm2d(nhwc(x), eps=self.eps))  # [B, C, H, W] channels-last

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class GeluGlobalResponseNorm(nn.Module):
    """GRN(GELU(h)) on [B, H, W, C]; the GELU of the slot before it is fused in here."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.empty(1, 1, 1, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return grn_gelu(h, self.gamma, self.beta)


def conv_mapper(c_in: int, c: int) -> nn.Sequential:
    """Stage B effnet/pixels mapper: Conv1x1(c_in -> 4c), GELU, Conv1x1(4c -> c), LayerNorm2d."""
    return nn.Sequential(Conv1x1(c_in, 4 * c), nn.GELU(), Conv1x1(4 * c, c), LayerNorm2d())


class ResBlock(nn.Module):
    """'C': x + MLP(cat(LN(depthwise(x)), skip)) with GELU+GRN inside the MLP."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d()
        self.channelwise = nn.Sequential(
            Linear(c + c_skip, 4 * c),
            nn.Identity(),  # GELU, fused into slot 2
            GeluGlobalResponseNorm(4 * c),
            nn.Identity(),  # dropout, off at inference
            Linear(4 * c, c),
        )

    def branch(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """The block without its residual add: MLP(cat(LN(depthwise(x)), skip)), [B, C, H, W]."""
        # x: [B, C, H, W]; skip: [B, C_skip, H, W] or None (both channels-last)
        h = nhwc(self.norm(self.depthwise(x)))  # [B, H, W, C]
        if skip is not None:
            h = torch.cat([h, nhwc(skip)], dim=-1)  # [B, H, W, C + C_skip]
        return nchw(self.channelwise(h))  # a fresh channels-last tensor

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.branch(x, skip)
        h += x
        return h


class TimestepBlock(nn.Module):
    """'T': x * (1 + a) + b, with (a, b) summed over one Linear per 64-d r-embedding chunk."""

    def __init__(self, c: int, c_r: int, conds: tuple[str, ...]) -> None:
        super().__init__()
        self.conds = conds
        self.mapper = Linear(c_r, 2 * c)
        for name in conds:
            self.add_module(f"mapper_{name}", Linear(c_r, 2 * c))

    def modulation(self, r_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r_embed [B or 1, c_r * (1 + len(conds))] -> (a, b), [B or 1, C] each."""
        chunks = r_embed.chunk(1 + len(self.conds), dim=1)
        ab = self.mapper(chunks[0])  # [B, 2C]
        for name, t in zip(self.conds, chunks[1:], strict=True):
            ab = ab + getattr(self, f"mapper_{name}")(t)
        a, b = ab.chunk(2, dim=1)
        return a, b

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        # x: [B, C, H, W]
        a, b = self.modulation(r_embed)
        return nchw(torch.addcmul(b[:, None, None], nhwc(x), 1 + a[:, None, None]))


class MultiheadAttentionWeights(nn.Module):
    """nn.MultiheadAttention's parameters under its names: fused in_proj [3C, C], out_proj."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.empty(3 * c, c))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * c))
        self.out_proj = Linear(c, c)


class Attention2D(nn.Module):
    """Container that puts the weights at `attention.attn.*`, as in the official checkpoints."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.attn = MultiheadAttentionWeights(c)


class AttnBlock(nn.Module):
    """'A': x + MHA(LN(x) tokens; keys/values = [LN(x) tokens ; kv_mapper(cond)]).

    The condition tokens' k/v depend only on the conditioning, so `cond_kv` computes them once
    per generation; `forward` never concatenates image and condition tokens.
    """

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True) -> None:
        super().__init__()
        if nhead <= 0 or c % nhead:
            raise ValueError(f"AttnBlock: {c} channels cannot be split into {nhead} heads")
        self.c, self.nhead, self.self_attn = c, nhead, self_attn
        self.index = -1  # position among the model's attention blocks, set by the model
        self.norm = LayerNorm2d()
        self.attention = Attention2D(c)
        self.kv_mapper = nn.Sequential(nn.SiLU(), Linear(c_cond, c))

    def cond_kv(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cond [B, Nc, c_cond] (normalised tokens) -> k, v [B, Nc, nhead, head_dim]."""
        c, attn = self.c, self.attention.attn
        kv = self.kv_mapper(cond)  # [B, Nc, C]
        kv = F.linear(kv, attn.in_proj_weight[c:], attn.in_proj_bias[c:])  # [B, Nc, 2C]
        k, v = kv.unflatten(-1, (2, self.nhead, c // self.nhead)).unbind(2)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        cond_k: torch.Tensor,
        cond_v: torch.Tensor,
        modulation: tuple[torch.Tensor, torch.Tensor] | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: [B, C, H, W]; cond_k, cond_v: [B, Nc, nhead, D]. The preceding blocks' last steps
        # can be handed in to run inside the norm's pass: `residual` (a ResBlock's input, when x
        # is its branch output) is added first, then `modulation`, a TimestepBlock's (a, b).
        b, c, h, w = x.shape
        attn = self.attention.attn
        if modulation is None and residual is None:
            stream = nhwc(x)  # [B, H, W, C]
            tokens = layernorm2d(stream, eps=self.norm.eps)
        else:
            a, b_ = modulation if modulation is not None else (None, None)
            res = None if residual is None else nhwc(residual)
            tokens, stream = layernorm2d(
                nhwc(x), residual=res, scale=a, shift=b_, eps=self.norm.eps
            )
        tokens = tokens.view(b, h * w, c)  # row-major h*W+w token order
        heads = (self.nhead, c // self.nhead)
        if self.self_attn:
            qkv = F.linear(tokens, attn.in_proj_weight, attn.in_proj_bias)  # [B, HW, 3C]
            q, k, v = qkv.unflatten(-1, (3, *heads)).unbind(2)  # [B, HW, nhead, D] each
            o = attention(q, k, v, cond_k, cond_v)
        else:
            q = F.linear(tokens, attn.in_proj_weight[:c], attn.in_proj_bias[:c])
            o = attention(q.unflatten(-1, heads), cond_k, cond_v)
        o = attn.out_proj(o.view(b, h * w, c))  # [B, HW, C]
        o += stream.reshape(b, h * w, c)
        return nchw(o.view(b, h, w, c))


class UpDownBlock2d(nn.Module):
    """Stage C level transition: Conv1x1 plus an optional bilinear x2 / x0.5 resample.

    The conv sits at `blocks.0` going down and `blocks.1` going up (official keys).
    """

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool) -> None:
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"UpDownBlock2d: mode must be 'up' or 'down', got {mode!r}")
        self.up, self.enabled = mode == "up", enabled
        conv = Conv1x1(c_in, c_out)
        resample = nn.Identity()  # parameter-free; applied in forward
        self.blocks = nn.ModuleList([resample, conv] if self.up else [conv, resample])

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        h, w = x.shape[-2:]
        # nn.Upsample(scale_factor) output sizes: floor(size * scale)
        return resize(x, (h * 2, w * 2) if self.up else (h // 2, w // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return self.blocks[1](self._resample(x))
        return self._resample(self.blocks[0](x))
