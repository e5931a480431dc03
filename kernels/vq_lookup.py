"""vq_lookup in Triton: nearest codeword by squared L2 distance, ties to the lowest index.

Math: dist(n, k) = sum_d (x[n, d] - c[k, d])^2 in fp32, the direct form as in csrc/vq_lookup.*
(no |x|^2 - 2x.c + |c|^2 cancellation). Each program owns BLOCK_N rows and walks the codebook in
tiles of BLOCK_K codewords, keeping a running (min, argmin) per row; a later tile replaces the
running pair only when strictly smaller, and inside a tile the lowest index of the minimum wins,
so ties resolve to the lowest index as torch.argmin does. The quantized rows are a gather of the
codebook in its own dtype, so they equal codebook[indices] bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64
BLOCK_K = 128


@triton.jit
def _vq_lookup_kernel(
    x_ptr,  # [N, D] contiguous, fp32/fp16/bf16
    codebook_ptr,  # [K, D] contiguous, same dtype as x
    indices_ptr,  # [N] int64
    quantized_ptr,  # [N, D] contiguous, same dtype as x
    n_rows,
    n_codes,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D, for the final 2-D gather
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < n_rows
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_k = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(0, n_codes, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        k_mask = ks < n_codes
        dist = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        # D is small (4 for Stage A): one column of x and of the tile per step keeps the live
        # state at [BLOCK_N, BLOCK_K] instead of a [BLOCK_N, BLOCK_K, D] cube.
        for t in tl.static_range(D):
            xt = tl.load(x_ptr + rows * D + t, mask=row_mask, other=0.0).to(tl.float32)
            ct = tl.load(codebook_ptr + ks * D + t, mask=k_mask, other=0.0).to(tl.float32)
            diff = xt[:, None] - ct[None, :]
            dist += diff * diff
        dist = tl.where(k_mask[None, :], dist, float("inf"))
        tile_min = tl.min(dist, axis=1)  # [BLOCK_N]
        # Lowest index among the codewords at the tile minimum.
        tile_k = tl.min(tl.where(dist == tile_min[:, None], ks[None, :], n_codes), axis=1)
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_k = tl.where(better, tile_k, best_k)

    tl.store(indices_ptr + rows, best_k.to(tl.int64), mask=row_mask)
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = row_mask[:, None] & (cols[None, :] < D)
    q = tl.load(codebook_ptr + best_k.to(tl.int64)[:, None] * D + cols[None, :], mask=mask)
    tl.store(quantized_ptr + rows[:, None] * D + cols[None, :], q, mask=mask)


def vq_lookup_triton(
    x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, quantized: torch.Tensor
) -> None:
    """Writes indices [N] int64 and quantized [N, D]; x [N, D], codebook [K, D] contiguous."""
    n, d = x.shape
    k = codebook.shape[0]
    if not (x.is_contiguous() and codebook.is_contiguous() and quantized.is_contiguous()):
        raise ValueError("vq_lookup_triton: x, codebook and quantized must be contiguous")
    if k >= 2**31:
        raise ValueError(f"vq_lookup_triton: codebook has {k} rows; indices are held in int32")
    grid = (triton.cdiv(n, BLOCK_N),)
    _vq_lookup_kernel[grid](
        x,
        codebook,
        indices,
        quantized,
        n,
        k,
        D=d,
        BLOCK_D=triton.next_power_of_2(d),
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        # Explicit: Triton 3.9 warns when this is left to a default that 3.10 changes. Fusing
        # diff * diff + acc into one FMA only makes the fp32 sum more exact.
        enable_fp_fusion=True,
    )
