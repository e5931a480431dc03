"""attention: the cascade's self+cross attention at its real 1024² shapes, bf16, head dim 64.

    python bench/bench_attention.py [--quick] [--device cpu|cuda]

Shapes (batch 2 = classifier-free guidance): Stage C 32 heads, 576 image + 85 condition tokens;
Stage B 20 heads at 32x32 (1024 + 4) and 16x16 (256 + 4). Inputs are laid out as the models
produce them: q, k, v strided slices of one fused [B, N, 3, H, D] projection, k2, v2 of a
[B, Nc, 2, H, D] one.

Rows: our backends (the fused kernels read the slices in place, never concatenating); torch SDPA
forced to each of its backends (flash, efficient, cudnn, math) on the concatenated keys/values,
with the two torch.cat calls timed in a row of their own and cat + default SDPA in another; and
torch.compile of the reference op (cat, fp32 SDPA). TFLOP/s counts 4·B·H·Nq·(Nk+Nc)·D and is set
against the measured bf16 matmul peak. Each row carries max_abs_err against float64 on the first
two heads. A backend that cannot run here (no GPU, no extension, no SDPA kernel for the inputs)
gives a row with its error instead of a timing.
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from cascade_rt.ops import attention
from cascade_rt.ops.reference import attention_torch
from cascade_rt.ops.registry import backends

OP = "attention"
HEAD_DIM = 64
# name: (B, H, Nq = Nk image tokens, Nc condition tokens)
SHAPES = {
    "stage_c": (2, 32, 576, 85),
    "stage_b_32x32": (2, 20, 1024, 4),
    "stage_b_16x16": (2, 20, 256, 4),
}
SDPA = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def _inputs(b, h, n, nc, dtype, device):
    """q, k, v as slices of a fused qkv projection; k2, v2 of a fused condition kv projection."""
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(b, n, 3, h, HEAD_DIM, generator=g).to(device, dtype)
    kv2 = torch.randn(b, nc, 2, h, HEAD_DIM, generator=g).to(device, dtype)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], kv2[:, :, 0], kv2[:, :, 1]


def _cat(k, v, k2, v2):
    return torch.cat([k, k2], dim=1), torch.cat([v, v2], dim=1)


def _sdpa(q, kc, vc):
    """[B, N, H, D] in and out; SDPA itself works on [B, H, N, D] views."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2))
    return o.transpose(1, 2)


def _reference(q, k, v, k2, v2):
    out = torch.empty_like(q)
    attention_torch(q, k, v, k2, v2, out)
    return out


def _max_err(out: torch.Tensor, inputs) -> float:
    """Max abs error on the first two heads against float64 cat + softmax."""
    q, k, v, k2, v2 = (t[:, :, :2].double() for t in inputs)
    kc, vc = _cat(k, v, k2, v2)
    s = q.transpose(1, 2) @ kc.permute(0, 2, 3, 1) / HEAD_DIM**0.5  # [B, 2, Nq, Nk + Nc]
    ref = (s.softmax(-1) @ vc.transpose(1, 2)).transpose(1, 2)
    return (out[:, :, :2].double() - ref).abs().max().item()


def _candidates(device: torch.device, dtype: torch.dtype, inputs, cat_kv):
    """(name, fn() -> out or None, unavailable reason or None) for every row."""
    q, k, v, k2, v2 = inputs
    kc, vc = cat_kv
    out = []
    for name, impl in sorted(backends(OP).items()):
        if name == "triton" and device.type == "cpu":
            # On CPU Triton only runs in its interpreter: a correctness tool, not a speed.
            out.append((name, None, "triton runs only interpreted on cpu"))
        elif not impl.supports(device=device, dtype=dtype, head_dim=HEAD_DIM):
            out.append((name, None, f"backend {name} unavailable on {device.type}"))
        else:
            out.append((name, lambda name=name: attention(*inputs, backend=name), None))
    out.append(("torch.cat(k,k2)+(v,v2)", lambda: _cat(k, v, k2, v2), None))
    for label, kind in SDPA.items():

        def run(kind=kind):
            with sdpa_kernel(kind):
                return _sdpa(q, kc, vc)

        out.append((f"sdpa[{label}]", run, None))
    out.append(("cat+sdpa", lambda: _sdpa(q, *_cat(k, v, k2, v2)), None))
    compiled = torch.compile(_reference, dynamic=False)
    out.append(("torch.compile(reference)", lambda: compiled(*inputs), None))
    return out


def main(quick: bool = False, device: str | None = None) -> list[dict]:
    device = torch.device(device) if device is not None else common.default_device()
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16
    # CPU timings of attention only show that the script runs: one shape, a few calls.
    shapes = SHAPES if on_gpu and not quick else {"stage_c": SHAPES["stage_c"]}
    warmup, iters = (10, 50) if on_gpu else (1, 3)
    if quick:
        warmup, iters = min(warmup, 3), min(iters, 10)
    rows = []
    for shape_name, (b, h, n, nc) in shapes.items():
        shape = f"{shape_name} B={b} H={h} Nq={n} Nk={n} Nc={nc} D={HEAD_DIM}"
        inputs = _inputs(b, h, n, nc, dtype, device)
        cat_kv = _cat(*inputs[1:])
        flops = 4 * b * h * n * (n + nc) * HEAD_DIM
        cat_bytes = sum(t.numel() * t.element_size() for t in cat_kv)
        for name, fn, unavailable in _candidates(device, dtype, inputs, cat_kv):
            if unavailable is not None:
                r = common.row(OP, name, shape, dtype, device, error=unavailable)
            else:
                is_cat = name.startswith("torch.cat")
                # The cat reads k, v, k2, v2 and writes both concatenations once: GB/s, not FLOPs.
                rate = {"nbytes": 2 * cat_bytes} if is_cat else {"flops": flops}
                try:
                    err = None if is_cat else _max_err(fn(), inputs)
                except Exception:  # measure() below records the error in the row
                    err = None
                r = common.measure(
                    OP,
                    name,
                    shape,
                    dtype,
                    device,
                    fn,
                    warmup=warmup,
                    iters=iters,
                    peak_dtype=None if is_cat else dtype,
                    **rate,
                )
                if err is not None:
                    r["max_abs_err"] = err
            common.emit(r, OP, rows)
    print(f"wrote {len(rows)} rows to {common.results_path(OP)}")
    return rows


if __name__ == "__main__":
    parser = common.bench_parser(__doc__)
    args = parser.parse_args()
    main(quick=args.quick, device=args.device)
