"""groupnorm_silu: GroupNorm (affine) + SiLU at SD-style UNet/VAE shapes, G = 32, both layouts.

    python bench/bench_groupnorm_silu.py [--quick] [--device cpu|cuda] [--no-compile]

Shapes: [2, 320, 128, 128], [2, 640, 64, 64], [2, 1280, 32, 32] (and batch 1), NCHW and
channels-last, bf16. Bytes = 3 N (the statistics pass reads x, the apply pass reads x again and
writes out). Rows: every registered backend that runs here (Triton only on GPU), `torch` = the
reference in eager mode (F.group_norm then F.silu, fp32 math), `torch.compile` = the reference
compiled, `torch(native dtype)` = F.silu(F.group_norm(x)) in x's dtype, what a user writes.
GB/s against the measured copy bandwidth. `valid`: within 2x the torch reference's error
against float64 on the whole output.
"""

from __future__ import annotations

import common
import torch
import torch.nn.functional as F

from cascade_rt.ops.groupnorm_silu import groupnorm_silu
from cascade_rt.ops.reference import groupnorm_silu_torch
from cascade_rt.ops.registry import backends

OP = "groupnorm_silu"
GROUPS = 32
EPS = 1e-5
SHAPES = [(320, 128, 128), (640, 64, 64), (1280, 32, 32)]  # (C, H, W)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _native(x, weight, bias, out):
    out.copy_(F.silu(F.group_norm(x, GROUPS, weight, bias, EPS)))


def _candidates(device, dtype, compile_ref: bool):
    out = []
    for name, impl in sorted(backends(OP).items()):
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter: a correctness tool, not a speed
        if impl.supports(device=device, dtype=dtype):

            def run(x, w, b, o, name=name):
                groupnorm_silu(x, GROUPS, w, b, eps=EPS, out=o, backend=name)

            out.append((name, run))
    out.append(("torch(native dtype)", _native))
    if compile_ref:
        torch._dynamo.reset()  # a fresh compile per shape, never the recompile limit's eager
        compiled = torch.compile(groupnorm_silu_torch, dynamic=False)
        out.append(("torch.compile", lambda x, w, b, o: compiled(x, w, b, o, GROUPS, EPS)))
    return out


def _bench_one(b, chw, layout, dtype, device, gen, compile_ref, quick) -> list[dict]:
    fmt = LAYOUTS[layout]
    c = chw[0]
    x = torch.randn(b, *chw, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    weight = (1 + 0.5 * torch.randn(c, generator=gen)).to(device, dtype)
    bias = (0.5 * torch.randn(c, generator=gen)).to(device, dtype)
    ref = F.silu(F.group_norm(x.double(), GROUPS, weight.double(), bias.double(), EPS))
    own = torch.empty(x.shape, dtype=torch.float32, device=device)
    groupnorm_silu_torch(x, weight, bias, own, GROUPS, EPS)
    tol = 2 * (own.to(dtype).double() - ref).abs().max().item() + 1e-5
    del own
    on_gpu = device.type == "cuda"
    warmup, iters = (10, 50) if on_gpu else (2, 10)
    if quick:
        warmup, iters = min(warmup, 2), min(iters, 5)
    rows = []
    for name, fn in _candidates(device, dtype, compile_ref):
        o = torch.empty_like(x)  # keeps x's memory format
        try:
            fn(x, weight, bias, o)
            valid = (o.double() - ref).abs().max().item() <= tol
        except Exception:  # measure() records the error in the row
            valid = None
        r = common.measure(
            OP,
            name,
            f"{layout} G={GROUPS} [{b}, {', '.join(map(str, chw))}]",
            dtype,
            device,
            lambda fn=fn, o=o: fn(x, weight, bias, o),
            warmup=warmup,
            iters=iters,
            nbytes=3 * x.numel() * x.element_size(),
        )
        r["valid"] = valid
        common.emit(r, OP, rows)
    return rows


def main(quick: bool = False, device: str | None = None, compile_ref: bool = True) -> list[dict]:
    device = torch.device(device) if device is not None else common.default_device()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for chw in SHAPES[:1] if quick else SHAPES:
        for b in (2,) if quick else (1, 2):
            for layout in LAYOUTS:
                rows += _bench_one(b, chw, layout, torch.bfloat16, device, gen, compile_ref, quick)
    print(f"wrote {len(rows)} rows to {common.results_path(OP)}")
    return rows


if __name__ == "__main__":
    parser = common.bench_parser(__doc__)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    args = parser.parse_args()
    main(quick=args.quick, device=args.device, compile_ref=not args.no_compile)
