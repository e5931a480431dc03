"""vq_lookup: Stage A's quantizer at 1024² (N = 65536·B rows of width D = 4, K = 8192 codewords).

    python bench/bench_vq_lookup.py [--quick] [--device cpu|cuda]

Backends: every registered one that supports the device ("torch" is the reference, cdist + argmin,
in eager mode), plus torch.compile of the reference and of the direct form
((x - c)^2).sum(-1).argmin(-1), which inductor can fuse into one reduction over K. Every kernel
computes in fp32 whatever the input dtype, so TFLOP/s (3 flops per row, codeword and dim: sub,
mul, add) is set against the measured fp32 matmul peak.
"""

from __future__ import annotations

import common
import torch

from cascade_rt.ops import vq_lookup
from cascade_rt.ops.registry import backends

OP = "vq_lookup"
K, D = 8192, 4
ROWS_PER_IMAGE = 65536  # (1024 / 4)^2 latent pixels


def _reference(x: torch.Tensor, codebook: torch.Tensor):
    indices = torch.cdist(x.float(), codebook.float()).argmin(dim=1)
    return indices, codebook[indices]


def _direct(x: torch.Tensor, codebook: torch.Tensor):
    dist = ((x.float()[:, None, :] - codebook.float()[None, :, :]) ** 2).sum(-1)  # [N, K]
    indices = dist.argmin(dim=1)
    return indices, codebook[indices]


def _valid(indices: torch.Tensor, quantized: torch.Tensor, x: torch.Tensor, cb: torch.Tensor):
    """Checks the first 512 rows against float64: the chosen codeword is a nearest one (within
    fp32 rounding, as in tests/test_vq_lookup.py) and quantized == codebook[indices]."""
    xs, idx, cb = x[:512].double().cpu(), indices[:512].cpu(), cb.cpu()
    dist = ((xs[:, None, :] - cb.double()[None, :, :]) ** 2).sum(-1)  # [512, K]
    excess = dist.gather(1, idx[:, None])[:, 0] - dist.min(dim=1).values
    tol = 1e-6 * ((xs**2).sum(1) + (cb.double() ** 2).sum(1).max())
    return bool((excess <= tol).all()) and torch.equal(quantized[:512].cpu(), cb[idx])


def _candidates(device: torch.device, dtype: torch.dtype):
    """(backend name, fn(x, codebook)) for everything that can run here."""
    out = []
    for name, impl in sorted(backends(OP).items()):
        # Triton on CPU means its interpreter (TRITON_INTERPRET=1): a correctness tool, not a speed.
        if name == "triton" and device.type == "cpu":
            continue
        if impl.supports(device=device, dtype=dtype, dim=D):
            out.append((name, lambda x, c, name=name: vq_lookup(x, c, backend=name)))
    out.append(("torch.compile", torch.compile(_reference, dynamic=False)))
    # Eager, the direct form would materialise [N, K, D]; only the fused compiled form is timed.
    out.append(("torch.compile(direct)", torch.compile(_direct, dynamic=False)))
    return out


def main(quick: bool = False, device: str | None = None) -> list[dict]:
    device = torch.device(device) if device is not None else common.default_device()
    on_gpu = device.type == "cuda"
    batches = (1,) if quick else (1, 2)
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float32)
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in batches:
        n = ROWS_PER_IMAGE * b
        x32 = torch.randn(n, D, generator=g)
        cb32 = torch.randn(K, D, generator=g)
        for dtype in dtypes:
            x, cb = x32.to(device, dtype), cb32.to(device, dtype)
            elem = x.element_size()
            for name, fn in _candidates(device, dtype):
                # The torch paths on CPU take seconds a call: a few runs give a stable median.
                slow = not on_gpu and name != "cpp"
                warmup, iters = (10, 50) if on_gpu else ((1, 3) if slow else (2, 10))
                if quick:
                    warmup, iters = min(warmup, 2), min(iters, 5)
                try:
                    valid = _valid(*fn(x, cb), x, cb)
                except Exception:  # measure() below records the error in the row
                    valid = None
                r = common.measure(
                    OP,
                    name,
                    f"N={n} D={D} K={K}",
                    dtype,
                    device,
                    lambda fn=fn, x=x, cb=cb: fn(x, cb),
                    warmup=warmup,
                    iters=iters,
                    nbytes=(2 * n * D + K * D) * elem + 8 * n,
                    flops=3 * n * K * D,
                    peak_dtype=torch.float32,
                )
                r["valid"] = valid
                common.emit(r, OP, rows)
    print(f"wrote {len(rows)} rows to {common.results_path(OP)}")
    return rows


if __name__ == "__main__":
    parser = common.bench_parser(__doc__)
    args = parser.parse_args()
    main(quick=args.quick, device=args.device)
