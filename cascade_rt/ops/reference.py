"""Plain PyTorch reference for every op: the fallback on any device and the test oracle.

Each `<op>_torch` writes into `out` (already allocated and validated by the public op in
cascade_rt/ops/<op>.py) and computes its reductions in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layernorm2d_torch(x: torch.Tensor, out: torch.Tensor, eps: float) -> None:
    """LayerNorm over the last (channel) dim, no affine. x, out: [..., C]."""
    out.copy_(F.layer_norm(x.float(), (x.shape[-1],), eps=eps))


def grn_gelu_torch(
    h: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, out: torch.Tensor
) -> None:
    """GlobalResponseNorm(GELU(h)). h, out: [B, H, W, C]; gamma, beta: [C]."""
    g = F.gelu(h.float())  # exact erf form
    gx = torch.linalg.vector_norm(g, dim=(1, 2), keepdim=True)  # [B, 1, 1, C]
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    out.copy_(gamma.float() * (g * nx) + beta.float() + g)


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
