"""groupnorm_silu in Triton: SiLU(GroupNorm(x)) with a per-channel affine, NCHW or channels-last.

Math, per sample b and group g of Cg = C / G channels x HW pixels:
  y = (x - mean) / sqrt(var + eps) * w[c] + bias[c];  out = y * sigmoid(y)
Element (j, p) of a group (channel j of the group, pixel p) sits at
  b * C * HW + (g * Cg + j) * stride_c + p * stride_p
with (stride_c, stride_p) = (HW, 1) for NCHW and (1, C) for channels-last, so one set of kernels
serves both layouts. Three kernels, as csrc/groupnorm_silu.cu: stats (per (sample, group, tile of
pixels): each [BLOCK_J, BLOCK_P] block's moments by an exact two-pass in registers, merged into the
tile's with Chan's formula), finalize (a fixed tree of Chan merges over the tiles -> mean, rstd),
apply. fp32 throughout, never E[x^2] - E[x]^2; no atomics, so results are reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TILE_ELEMS = 4096  # elements per [BLOCK_J, BLOCK_P] block
_BLOCK_T = 64  # tiles merged per step of the finalize kernel


@triton.jit
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    # Moments of the union of two disjoint sets (Chan et al.); empty sets carry n = 0.
    n = n_a + n_b
    w = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * w, m2_a + m2_b + delta * delta * n_a * w


@triton.jit
def _groupnorm_silu_stats_kernel(
    x_ptr,  # [B, C, HW] or [B, HW, C] contiguous
    partial_ptr,  # [B * G, tiles, 3] fp32: count, mean, M2
    HW,
    C,
    Cg,
    tile_pixels,
    stride_c,
    stride_p,
    BLOCK_J: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    base = x_ptr + b * C * HW + (g * Cg).to(tl.int64) * stride_c
    p_start = tile * tile_pixels
    p_end = tl.minimum(p_start + tile_pixels, HW)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for j0 in range(0, Cg, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)  # [BLOCK_J]
        for p0 in range(p_start, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P]
            mask = (j < Cg)[:, None] & (p < p_end)[None, :]
            offs = j.to(tl.int64)[:, None] * stride_c + p.to(tl.int64)[None, :] * stride_p
            v = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            n_blk = tl.sum(mask.to(tl.float32))
            mean_blk = tl.sum(v) / n_blk
            d = tl.where(mask, v - mean_blk, 0.0)
            n, mean, m2 = _chan(n, mean, m2, n_blk, mean_blk, tl.sum(d * d))
    out = partial_ptr + ((b * tl.num_programs(1) + g) * tl.num_programs(0) + tile) * 3
    tl.store(out, n)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _groupnorm_silu_finalize_kernel(
    partial_ptr,  # [B * G, tiles, 3] fp32
    stats_ptr,  # [B * G, 2] fp32: mean, rstd
    tiles,
    eps,
    BLOCK_T: tl.constexpr,
):
    bg = tl.program_id(0).to(tl.int64)
    n = 0.0
    mean = 0.0
    m2 = 0.0
    for t0 in range(0, tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = t < tiles
        src = partial_ptr + (bg * tiles + t) * 3
        n_t = tl.load(src, mask=mask, other=0.0)
        mean_t = tl.load(src + 1, mask=mask, other=0.0)
        m2_t = tl.load(src + 2, mask=mask, other=0.0)
        n_b, mean_b, m2_b = tl.reduce((n_t, mean_t, m2_t), 0, _chan)
        n, mean, m2 = _chan(n, mean, m2, n_b, mean_b, m2_b)
    tl.store(stats_ptr + bg * 2, mean)
    tl.store(stats_ptr + bg * 2 + 1, 1.0 / tl.sqrt(tl.maximum(m2 / n, 0.0) + eps))


@triton.jit
def _groupnorm_silu_apply_kernel(
    x_ptr,  # [B, C, HW] or [B, HW, C] contiguous
    weight_ptr,  # [C]
    bias_ptr,  # [C]
    stats_ptr,  # [B * G, 2] fp32
    out_ptr,  # same layout as x
    HW,
    C,
    Cg,
    tile_pixels,
    stride_c,
    stride_p,
    BLOCK_J: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offset = b * C * HW + (g * Cg).to(tl.int64) * stride_c
    st = stats_ptr + (b * tl.num_programs(1) + g) * 2
    mean = tl.load(st)
    rstd = tl.load(st + 1)
    p_start = tile * tile_pixels
    p_end = tl.minimum(p_start + tile_pixels, HW)
    for j0 in range(0, Cg, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)  # [BLOCK_J]
        jmask = j < Cg
        w = tl.load(weight_ptr + g * Cg + j, mask=jmask, other=0.0).to(tl.float32) * rstd
        bias = tl.load(bias_ptr + g * Cg + j, mask=jmask, other=0.0).to(tl.float32)
        for p0 in range(p_start, p_end, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P]
            mask = jmask[:, None] & (p < p_end)[None, :]
            offs = offset + j.to(tl.int64)[:, None] * stride_c + p.to(tl.int64)[None, :] * stride_p
            v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = (v - mean) * w[:, None] + bias[:, None]
            # Clamped so exp stays finite (the interpreter's numpy warns on overflow): for
            # y < -80, silu(y) is below 1e-33 with or without the clamp.
            y = y / (1.0 + tl.exp(-tl.maximum(y, -80.0)))
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def groupnorm_silu_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    workspace: torch.Tensor,
    num_groups: int,
    tiles: int,
    channels_last: bool,
    eps: float,
) -> None:
    """x, out: [B, C, H, W], both contiguous in NCHW or both in channels-last; weight, bias: [C];
    workspace: fp32 with B * G * (3 * tiles + 2) elements; 1 <= tiles <= H * W."""
    b, c = x.shape[:2]
    hw = x.numel() // (b * c)
    cg = c // num_groups
    tile_pixels = triton.cdiv(hw, tiles)
    partial = workspace[: b * num_groups * tiles * 3]
    stats = workspace[b * num_groups * tiles * 3 :]
    if channels_last:  # channels fastest: a block is a few pixels x the group's channels
        strides = (1, c)
        block_j = min(triton.next_power_of_2(cg), 256)
        block_p = min(triton.next_power_of_2(tile_pixels), max(1, _TILE_ELEMS // block_j))
    else:  # pixels fastest
        strides = (hw, 1)
        block_p = min(triton.next_power_of_2(tile_pixels), 1024)
        block_j = min(triton.next_power_of_2(cg), max(1, _TILE_ELEMS // block_p))
    grid = (tiles, num_groups, b)
    sizes = (hw, c, cg, tile_pixels, *strides)
    # enable_fp_fusion is explicit: Triton 3.9 warns when it is left to its default.
    _groupnorm_silu_stats_kernel[grid](
        x, partial, *sizes, BLOCK_J=block_j, BLOCK_P=block_p, enable_fp_fusion=True
    )
    _groupnorm_silu_finalize_kernel[(b * num_groups,)](
        partial, stats, tiles, eps, BLOCK_T=_BLOCK_T, enable_fp_fusion=True
    )
    _groupnorm_silu_apply_kernel[grid](
        x, weight, bias, stats, out, *sizes, BLOCK_J=block_j, BLOCK_P=block_p, enable_fp_fusion=True
    )
