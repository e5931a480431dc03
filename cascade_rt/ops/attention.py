"""attention: the cascade's combined self+cross attention, keys/values = [image ; condition]."""

from __future__ import annotations

import torch

from cascade_rt.ops._check import check_out, check_tensor
from cascade_rt.ops.reference import attention_torch
from cascade_rt.ops.registry import Impl, register, resolve

OP = "attention"
MAX_HEAD_DIM = 256

register(OP, Impl("torch", attention_torch, lambda **_: True))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k2: torch.Tensor | None = None,
    v2: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q K^T / sqrt(D)) V with K = [k ; k2], V = [v ; v2] along the token axis.

    q: [B, Nq, H, D]; k, v: [B, Nk, H, D]; k2, v2: [B, Nc, H, D] (optional second source, never
    concatenated in memory by the fused kernels). Returns out [B, Nq, H, D] in q's dtype.
    """
    check_tensor(OP, "q", q, ndim=4)
    b, _, h, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim {d} exceeds the supported maximum {MAX_HEAD_DIM}")
    pairs = [("k", k, "v", v)] + (
        [("k2", k2, "v2", v2)] if k2 is not None or v2 is not None else []
    )
    for kn, kt, vn, vt in pairs:
        if kt is None or vt is None:
            raise ValueError(f"{OP}: {kn} and {vn} must be given together")
        for name, t in ((kn, kt), (vn, vt)):
            check_tensor(OP, name, t, ndim=4, dtypes=(q.dtype,), device=q.device)
            if t.shape[0] != b or t.shape[2] != h or t.shape[3] != d:
                raise ValueError(
                    f"{OP}: {name} has shape {tuple(t.shape)}; "
                    f"expected [{b}, N, {h}, {d}] to match q"
                )
        if kt.shape[1] != vt.shape[1]:
            raise ValueError(f"{OP}: {kn} has {kt.shape[1]} tokens but {vn} has {vt.shape[1]}")
    out = check_out(OP, out, tuple(q.shape), q.dtype, q.device)
    impl = resolve(OP, backend, device=q.device, dtype=q.dtype, head_dim=d)
    impl.fn(q, k, v, k2, v2, out)
    return out
