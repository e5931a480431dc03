"""grn_gelu: GELU + GlobalResponseNorm between the ResBlock MLP's GEMMs, at the cascade's shapes.

    python bench/bench_grn_gelu.py [--quick] [--device cpu|cuda] [--no-compile]

Shapes at 1024², batch 1 and 2 (h [B, H, W, 4c], channels-last): Stage C 24x24x8192; Stage B
128²x1280, 64²x2560, 32²x5120, 16²x5120.
- grn_gelu: bytes = 3 N (GRN needs every pixel before any output: h is read by the statistics
  pass and again by the apply pass, out written once).
- grn_gelu_folded: g = GELU(h) and the [B, C] scale; bytes = 2 N (read h, write g).
- MLP tail, the choice behind the folded form (PERFORMANCE.md §4.3): `linear(grn_gelu(h))`
  against `grn_folded_linear(grn_gelu_folded(h))`, the second GEMM with the per-sample scale
  folded into a per-sample weight [B, c, 4c]; TFLOP/s counts the GEMM, 2 N c.
Rows: every registered backend that runs here (Triton only on GPU), `torch` = the reference in
eager mode, `torch.compile` = the reference compiled; GB/s against the measured copy bandwidth.
`valid`: within 2x the torch reference's error against float64 on the whole output.
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F

from cascade_rt.ops.grn_gelu import fold_grn_bias, grn_folded_linear, grn_gelu, grn_gelu_folded
from cascade_rt.ops.reference import grn_gelu_torch
from cascade_rt.ops.registry import backends

OP = "grn_gelu"
SHAPES = {  # name: (H, W, 4c)
    "stage_c": (24, 24, 8192),
    "stage_b_128": (128, 128, 1280),
    "stage_b_64": (64, 64, 2560),
    "stage_b_32": (32, 32, 5120),
    "stage_b_16": (16, 16, 5120),
}
CPU_SHAPES = ("stage_c", "stage_b_128", "stage_b_16")  # moderate sizes


def _oracle(h, gamma, beta):
    g = F.gelu(h.double())
    gx = torch.sqrt((g * g).sum(dim=(1, 2), keepdim=True))
    return gamma.double() * (g * gx / (gx.mean(-1, keepdim=True) + 1e-6)) + beta.double() + g


def _candidates(device, dtype, compile_ref: bool):
    out = []
    for name, impl in sorted(backends(OP).items()):
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter: a correctness tool, not a speed
        if impl.supports(device=device, dtype=dtype):
            out.append((name, lambda h, g, b, o, name=name: grn_gelu(h, g, b, out=o, backend=name)))
    if compile_ref:
        torch._dynamo.reset()  # a fresh compile per shape, never the recompile limit's eager
        out.append(("torch.compile", torch.compile(grn_gelu_torch, dynamic=False)))
    return out


def _measure(name, shape, dtype, device, fn, quick, **kw):
    on_gpu = device.type == "cuda"
    warmup, iters = (10, 50) if on_gpu else (2, 10)
    if quick:
        warmup, iters = min(warmup, 2), min(iters, 5)
    r = common.measure(OP, name, shape, dtype, device, fn, warmup=warmup, iters=iters, **kw)
    return r


def _bench_one(b, shape_name, dtype, device, gen, compile_ref, quick) -> list[dict]:
    hh, ww, c4 = SHAPES[shape_name]
    h = torch.randn(b, hh, ww, c4, generator=gen).to(device, dtype)
    gamma = (0.5 * torch.randn(c4, generator=gen)).to(device, dtype)
    beta = (0.5 * torch.randn(c4, generator=gen)).to(device, dtype)
    n, elem = h.numel(), h.element_size()
    label = f"B={b} {shape_name} {hh}x{ww}x{c4}"
    rows = []

    def emit(r, valid=None):
        if valid is not None:
            r["valid"] = valid
        common.emit(r, OP, rows)

    ref = _oracle(h, gamma, beta)
    own = torch.empty(h.shape, dtype=torch.float32, device=device)
    grn_gelu_torch(h, gamma, beta, own)
    tol = 2 * (own.to(dtype).double() - ref).abs().max().item() + 1e-5
    del own
    for name, fn in _candidates(device, dtype, compile_ref):
        o = torch.empty_like(h)
        try:
            fn(h, gamma, beta, o)
            valid = (o.double() - ref).abs().max().item() <= tol
        except Exception:  # measure() records the error in the row
            valid = None
        call = lambda fn=fn, o=o: fn(h, gamma, beta, o)  # noqa: E731
        emit(_measure(name, label, dtype, device, call, quick, nbytes=3 * n * elem), valid)
    del ref
    g, scale = torch.empty_like(h), torch.empty(b, c4, device=device)
    call = lambda: grn_gelu_folded(h, gamma, out=g, scale_out=scale)  # noqa: E731
    emit(_measure("folded", label, dtype, device, call, quick, nbytes=2 * n * elem))

    # MLP tail: GRN, then Linear(4c -> c), unfused against folded.
    c = c4 // 4
    weight = (torch.randn(c, c4, generator=gen) / c4**0.5).to(device, dtype)
    bias = torch.randn(c, generator=gen).to(device, dtype)
    folded_bias = fold_grn_bias(weight, bias, beta)

    def unfused():
        return F.linear(grn_gelu(h, gamma, beta), weight, bias)

    def folded():
        return grn_folded_linear(*grn_gelu_folded(h, gamma), weight, folded_bias)

    expected = unfused().float()
    close = (folded().float() - expected).abs().max().item() <= 0.05 * expected.abs().max().item()
    for name, fn in (("tail:grn_gelu+linear", unfused), ("tail:folded+bmm", folded)):
        r = _measure(name, label, dtype, device, fn, quick, flops=2 * n * c, peak_dtype=dtype)
        emit(r, close if fn is folded else None)
    return rows


def main(quick: bool = False, device: str | None = None, compile_ref: bool = True) -> list[dict]:
    device = torch.device(device) if device is not None else common.default_device()
    names = list(SHAPES) if device.type == "cuda" else list(CPU_SHAPES)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape_name in names[:2] if quick else names:
        for b in (1,) if quick else (1, 2):
            rows += _bench_one(b, shape_name, torch.bfloat16, device, gen, compile_ref, quick)
    print(f"wrote {len(rows)} rows to {common.results_path(OP)}")
    return rows


if __name__ == "__main__":
    parser = common.bench_parser(__doc__)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    args = parser.parse_args()
    main(quick=args.quick, device=args.device, compile_ref=not args.no_compile)
