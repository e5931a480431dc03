"""Plain PyTorch reference for every op: the fallback on any device and the test oracle.

Each `<op>_torch` writes into `out` (already allocated and validated by the public op in
cascade_rt/ops/<op>.py) and computes its reductions in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layernorm2d_torch(
    x: torch.Tensor,
    out: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    post_scale: torch.Tensor | None = None,
    post_shift: torch.Tensor | None = None,
    pre: torch.Tensor | None = None,
) -> None:
    """LayerNorm over the last (channel) dim, no affine, with the fused neighbours of
    cascade_rt.ops.layernorm2d: m = x (+ residual); m = m * (1 + scale) + shift per sample;
    pre = m; out = LN(m) (* (1 + post_scale) + post_shift).

    x, residual, out, pre: [B, ..., C]; scale, shift: [B or 1, C]; post_*: one element.
    """
    m = x.float()
    if residual is not None:
        m = m + residual.float()
    if scale is not None:
        per_sample = (scale.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        m = m * (1 + scale.float().reshape(per_sample)) + shift.float().reshape(per_sample)
    if pre is not None:
        pre.copy_(m)
    y = F.layer_norm(m, (x.shape[-1],), eps=eps)
    if post_scale is not None:
        y = y * (1 + post_scale.float().reshape(())) + post_shift.float().reshape(())
    out.copy_(y)


def grn_gelu_torch(
    h: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor | None,
    out: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> None:
    """GlobalResponseNorm(GELU(h)). h, out: [B, H, W, C]; gamma, beta: [C].

    With `scale` ([B, C] fp32) the folded form is written instead: out = GELU(h) and
    scale = 1 + gamma * N, so that the GRN output is out * scale + beta (beta is not read).
    """
    g = F.gelu(h.float())  # exact erf form
    gx = torch.linalg.vector_norm(g, dim=(1, 2), keepdim=True)  # [B, 1, 1, C]
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    if scale is not None:
        out.copy_(g)
        scale.copy_((1 + gamma.float() * nx).reshape(scale.shape))
        return
    out.copy_(gamma.float() * (g * nx) + beta.float() + g)


def groupnorm_silu_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor,
    num_groups: int,
    eps: float,
) -> None:
    """SiLU(GroupNorm(x)) with a per-channel affine. x, out: [B, C, H, W] (any memory format);
    weight, bias: [C]. `out` keeps the memory format it was allocated in (x's, by the op)."""
    # NCHW copy first: torch's CPU group_norm on channels-last input loses precision when the
    # mean is large against the spread (0.05 fp32 error at an offset of 1e3, torch 2.13), and the
    # oracle must not.
    xf = x.float().contiguous()  # [B, C, H, W], NCHW
    y = F.group_norm(xf, num_groups, weight.float(), bias.float(), eps)
    out.copy_(F.silu(y))


def attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k2: torch.Tensor | None,
    v2: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """softmax(q [k; k2]^T / sqrt(D)) [v; v2], fp32 math.

    q, out: [B, Nq, H, D]; k, v: [B, Nk, H, D]; k2, v2: [B, Nc, H, D] or None.
    """
    if k2 is not None:
        k = torch.cat([k, k2], dim=1)
        v = torch.cat([v, v2], dim=1)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
    o = F.scaled_dot_product_attention(qf, kf, vf)  # [B, H, Nq, D]
    out.copy_(o.transpose(1, 2))


def vq_lookup_torch(
    x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, quantized: torch.Tensor
) -> None:
    """Nearest codeword by L2 (cdist + argmin). x: [N, D]; codebook: [K, D]."""
    dist = torch.cdist(x.float(), codebook.float())  # [N, K]
    torch.argmin(dist, dim=1, out=indices)
    torch.index_select(codebook, 0, indices, out=quantized)
