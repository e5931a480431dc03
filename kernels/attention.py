"""attention, Triton: softmax(q [k; k2]^T / sqrt(D)) [v; v2] without concatenating the sources.

One program owns BLOCK_M query rows of one (batch, head) and streams the key/value blocks of
source 1 and then source 2 through an online softmax (flash-attention style): running row max
`m_i` and row sum `l_i` in fp32, the accumulator rescaled by exp2(m_old - m_new) at every block.
Scores are kept in the log2 domain (scaled by log2(e)/sqrt(D)) so the exponentials are exp2.
Inputs may be strided views (e.g. slices of a fused qkv projection); only the head dim must be
unit-stride. Masked key columns get -inf before the max, so padding never enters the softmax;
every key block holds at least one real key, so the running max is finite after the first block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies the raw bits of bf16 operands (triton-lang/triton#11584), so
    # CPU runs upcast them. That is exact: bf16 products fit in fp32, where the GPU accumulates too.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # ieee: fp32 inputs must not be rounded to tf32 (bf16/fp16 dots ignore the setting).
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _attend_source(
    acc,  # [BLOCK_M, BLOCK_D] fp32, unnormalized output
    m_i,  # [BLOCK_M] fp32, running max of the log2-domain scores
    l_i,  # [BLOCK_M] fp32, running sum of exp2(score - m_i)
    q,  # [BLOCK_M, BLOCK_D] input dtype
    k_ptr,  # [N, D] of this (batch, head), token stride stride_kn
    v_ptr,  # [N, D] of this (batch, head), token stride stride_vn
    n,
    stride_kn,
    stride_vn,
    qk_scale,
    offs_d,  # [BLOCK_D]
    d_mask,  # [BLOCK_D]
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(0, n, BLOCK_N):
        keys = start + offs_n  # [BLOCK_N]
        key_mask = keys < n
        kv_mask = key_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + keys[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), None, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N]
        s = tl.where(key_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)  # 0 on the first block, where m_i = -inf
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + keys[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        # P is rounded to the value dtype for the tensor-core dot, as in flash attention.
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_kernel(
    q_ptr,  # [B, Nq, H, D], strides (stride_qb, stride_qn, stride_qh, 1)
    k_ptr,  # [B, Nk, H, D], strides (stride_kb, stride_kn, stride_kh, 1)
    v_ptr,  # [B, Nk, H, D], strides (stride_vb, stride_vn, stride_vh, 1)
    k2_ptr,  # [B, Nc, H, D], strides (stride_k2b, stride_k2n, stride_k2h, 1); unused when Nc = 0
    v2_ptr,  # [B, Nc, H, D], strides (stride_v2b, stride_v2n, stride_v2h, 1); unused when Nc = 0
    out_ptr,  # [B, Nq, H, D], strides (stride_ob, stride_on, stride_oh, 1)
    n_q,
    n_k,
    n_c,
    qk_scale,  # log2(e) / sqrt(D)
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_k2b,
    stride_k2n,
    stride_k2h,
    stride_v2b,
    stride_v2n,
    stride_v2h,
    stride_ob,
    stride_on,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM (and >= 16, the smallest dot)
    UPCAST: tl.constexpr,  # dot operands to fp32: bf16 under the interpreter
):
    pid_m = tl.program_id(0)
    # int64 so batch/head offsets of large activations cannot overflow.
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_mask = offs_d < HEAD_DIM
    q_mask = (offs_m < n_q)[:, None] & d_mask[None, :]
    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=q_mask, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attend_source(
        acc,
        m_i,
        l_i,
        q,
        k_ptr + b * stride_kb + h * stride_kh,
        v_ptr + b * stride_vb + h * stride_vh,
        n_k,
        stride_kn,
        stride_vn,
        qk_scale,
        offs_d,
        d_mask,
        BLOCK_N,
        UPCAST,
    )
    # With n_c = 0 the loop body never runs and k2/v2 (aliases of k/v) are never read.
    acc, m_i, l_i = _attend_source(
        acc,
        m_i,
        l_i,
        q,
        k2_ptr + b * stride_k2b + h * stride_k2h,
        v2_ptr + b * stride_v2b + h * stride_v2h,
        n_c,
        stride_k2n,
        stride_v2n,
        qk_scale,
        offs_d,
        d_mask,
        BLOCK_N,
        UPCAST,
    )

    o = acc / l_i[:, None]
    o_base = out_ptr + b * stride_ob + h * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_on + offs_d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=q_mask,
    )


def _config(block_d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Untuned defaults in the range of Triton's
    fused-attention tutorial. Larger head dims take smaller key blocks to keep the K/V tiles and
    the accumulator small; at 256 a single stage keeps fp32 K/V tiles within the 99 KiB of shared
    memory that sm_86/sm_89 give a block."""
    if block_d <= 64:
        return 64, 64, 4, 2
    if block_d <= 128:
        return 64, 32, 4, 2
    return 32, 32, 4, 1


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k2: torch.Tensor | None,
    v2: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """Writes softmax(q [k; k2]^T / sqrt(D)) [v; v2] into `out`.

    q, out: [B, Nq, H, D]; k, v: [B, Nk, H, D]; k2, v2: [B, Nc, H, D] or None. Any strides with a
    unit-stride last dim; validated by cascade_rt.ops.attention.
    """
    batch, n_q, n_heads, head_dim = q.shape
    if k2 is None:
        k2, v2 = k, v  # never read: the second loop runs zero times
        n_c = 0
    else:
        n_c = k2.shape[1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _config(block_d)
    grid = (triton.cdiv(n_q, block_m), n_heads, batch)
    _attention_kernel[grid](
        q,
        k,
        v,
        k2,
        v2,
        out,
        n_q,
        k.shape[1],
        n_c,
        1.4426950408889634 / head_dim**0.5,
        *(s for t in (q, k, v, k2, v2, out) for s in t.stride()[:3]),
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        UPCAST=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        num_warps=num_warps,
        num_stages=num_stages,
        # Explicit (Triton 3.9 warns when it is left to its changing default): FMA contraction.
        enable_fp_fusion=True,
    )
