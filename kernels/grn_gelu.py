"""grn_gelu in Triton: GlobalResponseNorm(GELU(h)) between the two MLP GEMMs of a ResBlock.

Math (ConvNeXt-V2 GRN on g = GELU(h), exact erf), per sample b and channel c:
  S[b, c] = sum_p g^2;  G = sqrt(S);  scale[b, c] = 1 + gamma[c] * G / (mean_c G + 1e-6)
  out = g * scale + beta                 (= gamma * g * N + beta + g)
GRN needs a reduction over every pixel before any output, so four kernels (as csrc/grn_gelu.cu):
stats (per-tile partial S, fp32), colsum (S over tiles, in tile order: deterministic), scale
(mean over C), apply (g recomputed from h: one read instead of a write and a read of g). The
folded form (beta None) stores g in the stats kernel and stops after scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_P = 32  # pixels per step in stats/apply
_BLOCK_C = 128  # channels per program in stats/colsum/apply
_SCALE_BLOCK = 1024  # channels per step of the per-sample scale kernel


@triton.jit
def _gelu(v):
    return 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))


@triton.jit
def _grn_gelu_stats_kernel(
    h_ptr,  # [B, HW, C] contiguous
    g_ptr,  # [B, HW, C] contiguous: GELU(h) when STORE_G (h_ptr otherwise, unused)
    partial_ptr,  # [B, tiles, C] fp32
    HW,
    C,
    tile_pixels,
    STORE_G: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    p_start = tile * tile_pixels
    p_end = tl.minimum(p_start + tile_pixels, HW)
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for p0 in range(p_start, p_end, BLOCK_P):
        px = p0 + tl.arange(0, BLOCK_P)  # [BLOCK_P]
        mask = (px < p_end)[:, None] & cmask[None, :]
        offs = (b * HW + px)[:, None] * C + cols[None, :]
        g = _gelu(tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32))
        acc += tl.sum(g * g, axis=0)  # masked lanes hold GELU(0) = 0
        if STORE_G:
            tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(partial_ptr + (b * tl.num_programs(0) + tile) * C + cols, acc, mask=cmask)


@triton.jit
def _grn_gelu_colsum_kernel(
    partial_ptr,  # [B, tiles, C] fp32
    gx_ptr,  # [B, C] fp32: sqrt of the sum over tiles
    tiles,
    C,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for t in range(tiles):
        acc += tl.load(partial_ptr + (b * tiles + t) * C + cols, mask=cmask, other=0.0)
    tl.store(gx_ptr + b * C + cols, tl.sqrt(acc), mask=cmask)


@triton.jit
def _grn_gelu_scale_kernel(
    gamma_ptr,  # [C]
    scale_ptr,  # [B, C] fp32: G in, 1 + gamma * G / (mean G + 1e-6) out
    C,
    BLOCK: tl.constexpr,
):
    row = scale_ptr + tl.program_id(0).to(tl.int64) * C
    total = tl.zeros((BLOCK,), tl.float32)
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        total += tl.load(row + cols, mask=cols < C, other=0.0)
    inv = 1.0 / (tl.sum(total, axis=0) / C + 1e-6)
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        cmask = cols < C
        gx = tl.load(row + cols, mask=cmask, other=0.0)
        gamma = tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(row + cols, 1.0 + gamma * (gx * inv), mask=cmask)


@triton.jit
def _grn_gelu_apply_kernel(
    h_ptr,  # [B, HW, C] contiguous
    beta_ptr,  # [C]
    scale_ptr,  # [B, C] fp32
    out_ptr,  # [B, HW, C] contiguous
    HW,
    C,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    b = tl.program_id(2).to(tl.int64)
    px = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)  # [BLOCK_P]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    cmask = cols < C
    mask = (px < HW)[:, None] & cmask[None, :]
    offs = (b * HW + px)[:, None] * C + cols[None, :]
    g = _gelu(tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    s = tl.load(scale_ptr + b * C + cols, mask=cmask, other=0.0)
    beta = tl.load(beta_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = g * s[None, :] + beta[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def grn_gelu_triton(
    h: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor | None,
    out: torch.Tensor,
    scale: torch.Tensor,
    partial: torch.Tensor,
) -> None:
    """h, out: contiguous [B, H, W, C]; gamma, beta: [C]; scale: [B, C] fp32; partial:
    [B, tiles, C] fp32 workspace. beta None: the folded form (out = GELU(h), scale)."""
    b, height, width, c = h.shape
    hw = height * width
    tiles = partial.shape[1]
    c_blocks = triton.cdiv(c, _BLOCK_C)
    # enable_fp_fusion is explicit: Triton 3.9 warns when it is left to its default.
    _grn_gelu_stats_kernel[(tiles, c_blocks, b)](
        h,
        h if beta is not None else out,
        partial,
        hw,
        c,
        triton.cdiv(hw, tiles),
        STORE_G=beta is None,
        BLOCK_P=_BLOCK_P,
        BLOCK_C=_BLOCK_C,
        enable_fp_fusion=True,
    )
    _grn_gelu_colsum_kernel[(c_blocks, b)](
        partial, scale, tiles, c, BLOCK_C=_BLOCK_C, enable_fp_fusion=True
    )
    _grn_gelu_scale_kernel[(b,)](gamma, scale, c, BLOCK=_SCALE_BLOCK, enable_fp_fusion=True)
    if beta is not None:
        grid = (triton.cdiv(hw, _BLOCK_P), c_blocks, b)
        _grn_gelu_apply_kernel[grid](
            h, beta, scale, out, hw, c, BLOCK_P=_BLOCK_P, BLOCK_C=_BLOCK_C, enable_fp_fusion=True
        )
