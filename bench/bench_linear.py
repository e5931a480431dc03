"""The cascade's GEMMs (the ResBlock MLP's two Linears) against the device's matmul peak, and on
the CPU MKL's packed-weight GEMM, the lever bench/NOTES.md ("pipeline") weighs for Stage C.

    python bench/bench_linear.py [--quick] [--device cpu|cuda]

Shapes (M = pixels x batch 2, K, N): Stage C lite at 512² (12x12 latent, c = 1536) and Stage B
lite's first level at 512² (64x64, c = 320), both MLP GEMMs each. Rows: `F.linear` (what the
models run), and on the CPU `mkl packed` (`torch.ops.mkl._mkl_linear` on a weight packed once by
`_mkl_reorder_linear_weight`, as inductor's freezing pass does); TFLOP/s against the measured
matmul peak of the dtype (`pct_of_peak`). `valid`: within 1e-4 relative of `F.linear`.
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F

OP = "linear"
SHAPES = {  # name: (M, K, N)
    "stage_c_lite_512 mlp1": (288, 1536, 6144),
    "stage_c_lite_512 mlp2": (288, 6144, 1536),
    "stage_b_lite_512 l0 mlp1": (8192, 320, 1280),
    "stage_b_lite_512 l0 mlp2": (8192, 1280, 320),
}


def _mkl_packed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """A call of MKL's packed GEMM on `w` packed once, or None where this build has no MKL."""
    if not hasattr(torch.ops, "mkl") or not hasattr(torch.ops.mkl, "_mkl_linear"):
        return None
    m = x.shape[0]
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
    return lambda: torch.ops.mkl._mkl_linear(x, packed, w, b, m)


def main(quick: bool = False, device: str | None = None) -> list[dict]:
    dev = torch.device(device) if device else common.default_device()
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    iters = 5 if dev.type == "cpu" else 50
    rows: list[dict] = []
    names = list(SHAPES)[:2] if quick else list(SHAPES)
    for name in names:
        m, k, n = SHAPES[name]
        x = torch.randn(m, k, device=dev, dtype=dtype)
        w = torch.randn(n, k, device=dev, dtype=dtype) * k**-0.5
        b = torch.randn(n, device=dev, dtype=dtype)
        ref = F.linear(x, w, b)
        cases = {"F.linear": lambda x=x, w=w, b=b: F.linear(x, w, b)}
        if dev.type == "cpu" and (packed := _mkl_packed(x, w, b)) is not None:
            cases["mkl packed"] = packed
        for backend, fn in cases.items():
            r = common.measure(
                OP,
                backend,
                f"{name} M={m} K={k} N={n}",
                dtype,
                dev,
                fn,
                warmup=2 if dev.type == "cpu" else 10,
                iters=iters,
                flops=2 * m * k * n,
                peak_dtype=dtype,
            )
            if "error" not in r:
                err = (fn() - ref).abs().max() / ref.abs().max()
                r["valid"] = bool(err <= 1e-4)
            common.emit(r, OP, rows)
    return rows


if __name__ == "__main__":
    a = common.bench_parser(__doc__).parse_args()
    main(quick=a.quick, device=a.device)
