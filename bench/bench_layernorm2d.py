"""layernorm2d: LayerNorm over channels (no affine) and its fused forms at the cascade's shapes.

    python bench/bench_layernorm2d.py [--quick] [--device cpu|cuda] [--no-compile]

Shapes at 1024², batch 1 and 2 (x [B, H, W, C], channels-last): Stage C 24x24x2048; Stage B
128²x320, 64²x640, 32²x1280, 16²x1280; Stage A decode 256²x384. Forms:
- plain: out = LN(x)                                     bytes = 2 N (read x, write out)
- fused: m = (x + r) * (1 + a) + b; out = LN(m), pre = m  bytes = 4 N (read x, r; write out, pre)
  (ResBlock output + TimestepBlock + the AttnBlock norm; Stage C and the Stage B levels with
  attention, 32² and 16²)
- post:  out = LN(x) * (1 + g0) + g1, scalar g (Stage A)  bytes = 2 N
Rows: every registered backend that runs on the device (Triton only on GPU: on CPU it is the
interpreter), `torch` = the reference in eager mode (for the fused form: the unfused sequence
add, modulate, layer_norm), `torch.compile` = the reference compiled. GB/s is bytes over time, set
against the measured copy bandwidth. `valid`: within 2x the torch reference's error against
float64 (tests/op_checks.py's rule) on the whole output.
"""

from __future__ import annotations

import common
import torch

from cascade_rt.ops import layernorm2d
from cascade_rt.ops.reference import layernorm2d_torch
from cascade_rt.ops.registry import backends

OP = "layernorm2d"
EPS = 1e-6
# name: ((H, W, C), forms)
SHAPES = {
    "stage_c": ((24, 24, 2048), ("plain", "fused")),
    "stage_b_128": ((128, 128, 320), ("plain",)),
    "stage_b_64": ((64, 64, 640), ("plain",)),
    "stage_b_32": ((32, 32, 1280), ("plain", "fused")),
    "stage_b_16": ((16, 16, 1280), ("plain", "fused")),
    "stage_a_256": ((256, 256, 384), ("post",)),
}
CPU_SHAPES = ("stage_c", "stage_b_128", "stage_b_32", "stage_b_16")  # moderate sizes
BYTES_PER_ELEM = {"plain": 2, "fused": 4, "post": 2}


def _inputs(form: str, b: int, hwc: tuple[int, int, int], dtype, device) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (b, *hwc)
    c = hwc[-1]
    kw = {"x": torch.randn(shape, generator=g).to(device, dtype)}
    if form == "fused":
        kw["residual"] = torch.randn(shape, generator=g).to(device, dtype)
        ab = (0.3 * torch.randn(b, 2 * c, generator=g)).to(device, dtype)
        kw["scale"], kw["shift"] = ab.chunk(2, dim=1)
    if form == "post":
        gammas = torch.randn(6, generator=g).to(device, dtype)
        kw["post_scale"], kw["post_shift"] = gammas[0], gammas[1]
    return kw


def _oracle(x, residual=None, scale=None, shift=None, post_scale=None, post_shift=None):
    m = x.double()
    if residual is not None:
        m = m + residual.double()
        m = m * (1 + scale.double()[:, None, None]) + shift.double()[:, None, None]
    y = torch.nn.functional.layer_norm(m, (m.shape[-1],), eps=EPS)
    if post_scale is not None:
        y = y * (1 + post_scale.double()) + post_shift.double()
    return y


def _candidates(device: torch.device, dtype: torch.dtype, c: int, compile_ref: bool):
    """(name, fn(out, pre, **inputs)) for everything that runs here."""
    out = []
    for name, impl in sorted(backends(OP).items()):
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter: a correctness tool, not a speed
        if impl.supports(device=device, dtype=dtype, channels=c):

            def run(o, p, name=name, **kw):
                layernorm2d(**kw, eps=EPS, out=o, pre_out=p, backend=name)

            out.append((name, run))
    if compile_ref:
        torch._dynamo.reset()  # a fresh compile per shape, never the recompile limit's eager
        compiled = torch.compile(layernorm2d_torch, dynamic=False)

        def run_compiled(o, p, **kw):
            extra = {k: v for k, v in kw.items() if k != "x"}
            compiled(kw["x"], o, EPS, **extra, pre=p)

        out.append(("torch.compile", run_compiled))
    return out


def main(quick: bool = False, device: str | None = None, compile_ref: bool = True) -> list[dict]:
    device = torch.device(device) if device is not None else common.default_device()
    on_gpu = device.type == "cuda"
    names = list(SHAPES) if on_gpu else list(CPU_SHAPES)
    batches = (1,) if quick else (1, 2)
    dtype = torch.bfloat16
    rows = []
    for shape_name in names[:2] if quick else names:
        hwc, forms = SHAPES[shape_name]
        for b in batches:
            for form in forms:
                inputs = _inputs(form, b, hwc, dtype, device)
                x = inputs["x"]
                ref = _oracle(**inputs)
                own = torch.empty(x.shape, dtype=torch.float32, device=device)
                extra = {k: v for k, v in inputs.items() if k != "x"}
                layernorm2d_torch(x, own, EPS, **extra)
                tol = 2 * (own.to(dtype).double() - ref).abs().max().item() + 1e-5
                fused = form == "fused"
                for name, fn in _candidates(device, dtype, hwc[-1], compile_ref):
                    o = torch.empty_like(x)
                    p = torch.empty_like(x) if fused else None
                    try:
                        fn(o, p, **inputs)
                        valid = (o.double() - ref).abs().max().item() <= tol
                    except Exception:  # measure() below records the error in the row
                        valid = None
                    warmup, iters = (10, 50) if on_gpu else (2, 10)
                    r = common.measure(
                        OP,
                        name,
                        f"{form} B={b} {shape_name} {'x'.join(map(str, hwc))}",
                        dtype,
                        device,
                        lambda fn=fn, o=o, p=p, kw=inputs: fn(o, p, **kw),
                        warmup=min(warmup, 2) if quick else warmup,
                        iters=min(iters, 5) if quick else iters,
                        nbytes=BYTES_PER_ELEM[form] * x.numel() * x.element_size(),
                    )
                    r["valid"] = valid
                    common.emit(r, OP, rows)
    print(f"wrote {len(rows)} rows to {common.results_path(OP)}")
    return rows


if __name__ == "__main__":
    parser = common.bench_parser(__doc__)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    args = parser.parse_args()
    main(quick=args.quick, device=args.device, compile_ref=not args.no_compile)
