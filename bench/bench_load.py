"""Weight loading on CPU: our loader against the warm-page-cache file read and diffusers.

    python bench/bench_load.py [--quick] [--stage decoder|prior] [--dir /tmp/...] [--keep]

Writes random weights of the lite Stage B (0.70 B params, 2.8 GB in fp32; `--stage prior` for
the lite Stage C, 4.1 GB) as official fp32 and bf16 files and a diffusers fp32 folder, reads each
file once so the page cache is warm, then times (median of the runs; `--quick` one run):
- `read`: every byte of the file read into a reused 64 MiB buffer (`cat file > /dev/null`),
- `cascade_rt` loads: locate + meta build + `load_module`, fp32 -> fp32 (zero copy), bf16 file ->
  fp32 run (cast into an arena), diffusers-layout fp32 (q/k/v fused into the arena, rest mapped),
- `diffusers`: `StableCascadeUNet.from_pretrained(folder)` on the diffusers folder,
- after each load, `sum_s`: one pass summing every weight (the first read of the loaded memory),
- `arena_alloc`: a populated anonymous mapping against torch.empty + fill_ and against huge
  pages, at the fp32 size (the choice in cascade_rt/weights/arena.py).
`vs_read` is load time over the read time of the same file: the target is at most 1.5.
With a GPU present, `cascade_rt cuda staged` rows time `load_module(device="cuda")` (fp32 and bf16
files -> fp32 on the device) too. Files are deleted at the end unless `--keep`.
"""

from __future__ import annotations

import gc
import mmap
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch

from cascade_rt.models.unet import STAGE_B_LITE, STAGE_C_LITE, StableCascadeUNet, UNetConfig
from cascade_rt.random_weights import randomize_
from cascade_rt.weights import load_module, locate, write_component
from cascade_rt.weights.arena import MADV_POPULATE_WRITE, cpu_buffer, populate

OP = "load"
CONFIGS = {"decoder": STAGE_B_LITE, "prior": STAGE_C_LITE}


def _write(stage: str, config: UNetConfig, root: Path) -> dict[str, Path]:
    with torch.device("meta"):
        model = StableCascadeUNet(config)
    model = randomize_(model.to_empty(device="cpu"), seed=0)
    sd = model.state_dict()
    official = write_component(sd, stage, root / "official", layout="official", lite=True)[0]
    bf16 = write_component(
        sd,
        stage,
        root / "official",
        layout="official",
        lite=True,
        variant="bf16",
        dtype=torch.bfloat16,
    )[0]
    write_component(sd, stage, root / "diffusers", config=config.to_dict())
    return {"fp32": official, "bf16": bf16, "diffusers": root / "diffusers"}


def _weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in ([path] if path.is_file() else path.glob("*.safetensors")))


def _read_s(path: Path) -> float:
    buf = memoryview(bytearray(64 << 20))
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def _ours(stage: str, config: UNetConfig, path: Path, device: str) -> torch.nn.Module:
    source = locate(path, stage, lite=True)
    with torch.device("meta"):
        model = StableCascadeUNet(config)
    model = load_module(model, source, device=device, dtype=torch.float32)
    if device == "cuda":
        torch.cuda.synchronize()
    return model


def _diffusers(path: Path) -> torch.nn.Module:
    from diffusers import StableCascadeUNet as DiffusersUNet  # imported only when timed

    # Without `accelerate` (not in this venv) diffusers builds the model and copies the weights in.
    return DiffusersUNet.from_pretrained(path, low_cpu_mem_usage=False)


def _sum_s(model: torch.nn.Module) -> float:
    t0 = time.perf_counter()
    total = 0.0
    for p in model.state_dict().values():
        total += float(p.float().sum()) if p.is_floating_point() else 0.0
    return time.perf_counter() - t0


def _usage() -> tuple[int, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt, r.ru_stime


def _measure(load: Callable[[], torch.nn.Module], runs: int) -> dict[str, Any]:
    """Medians (and the best run: neighbours on a shared CPU only ever add time) of the load and
    of the first pass over the loaded weights, with the page faults and system time each took."""
    figures: dict[str, list[float]] = {}
    info: dict[str, int] = {}
    for _ in range(runs):
        gc.collect()
        for step in ("load", "sum"):
            f0, s0 = _usage()
            t0 = time.perf_counter()
            if step == "load":
                model = load()
            else:
                _sum_s(model)
            wall = time.perf_counter() - t0
            f1, s1 = _usage()
            for key, value in (
                (f"{step}_s", wall),
                (f"{step}_faults", f1 - f0),
                (f"{step}_sys_s", s1 - s0),
            ):
                figures.setdefault(key, []).append(value)
        info = {k: getattr(model, k) for k in ("mapped_bytes", "arena_bytes") if hasattr(model, k)}
        del model
    out: dict[str, Any] = {k: round(statistics.median(v), 4) for k, v in figures.items()}
    out.update(
        load_min_s=round(min(figures["load_s"]), 4), sum_min_s=round(min(figures["sum_s"]), 4)
    )
    return {**out, "load_runs_s": [round(t, 4) for t in figures["load_s"]], **info}


def _arena_rows(nbytes: int, runs: int) -> dict[str, float]:
    def huge() -> torch.Tensor:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        populate(m, MADV_POPULATE_WRITE)
        return torch.frombuffer(m, dtype=torch.uint8)

    ways = {
        "populate (used)": lambda: cpu_buffer(nbytes),
        "torch.empty+fill_": lambda: torch.empty(nbytes, dtype=torch.uint8).fill_(1),
        "hugepage+populate": huge,
    }
    out = {}
    for name, make in ways.items():
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            buf = make()
            times.append(time.perf_counter() - t0)
            del buf
        out[name] = statistics.median(times)
    return out


def _cases(
    stage: str, config: UNetConfig, paths: dict[str, Path]
) -> list[tuple[str, str, str, Callable[[], torch.nn.Module] | None]]:
    """(backend, file dtype, which file, loader or None for the plain read)."""

    def ours(key: str, device: str = "cpu") -> Callable[[], torch.nn.Module]:
        return lambda: _ours(stage, config, paths[key], device)

    cases = [
        ("read", "fp32", "fp32", None),
        ("cascade_rt zero-copy", "fp32", "fp32", ours("fp32")),
        ("cascade_rt cast", "bf16", "bf16", ours("bf16")),
        ("cascade_rt diffusers-layout", "fp32", "diffusers", ours("diffusers")),
        ("diffusers from_pretrained", "fp32", "diffusers", lambda: _diffusers(paths["diffusers"])),
        ("read", "bf16", "bf16", None),
    ]
    if torch.cuda.is_available():
        cases += [
            ("cascade_rt cuda staged", "fp32", "fp32", ours("fp32", "cuda")),
            ("cascade_rt cuda staged", "bf16", "bf16", ours("bf16", "cuda")),
        ]
    return cases


def main(
    quick: bool = False,
    device: str | None = None,
    stage: str = "decoder",
    root: Path = Path("/tmp/cascade_rt_bench_load"),
    keep: bool = False,
) -> list[dict[str, Any]]:
    """`device` is accepted for run_all; the CPU rows always run, CUDA rows when a GPU is there."""
    del device
    config, runs = CONFIGS[stage], 1 if quick else 3
    numel = sum(t.numel() for t in _meta_state(config).values())
    need = numel * (4 + 2 + 4)
    root.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(root).free < need * 1.2:
        raise SystemExit(f"{root}: {need / 1e9:.1f} GB needed for the checkpoints")
    cpu = torch.device("cpu")
    shape = f"{stage}_lite {numel / 1e6:.1f}M params"
    rows: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        paths = _write(stage, config, root)
        print(f"wrote checkpoints in {time.perf_counter() - t0:.1f} s")
        gc.collect()
        reads = {}
        for name, path in paths.items():
            _read_s(path)  # warm the page cache
            reads[name] = statistics.median(_read_s(path) for _ in range(runs))
        for backend, file_dtype, file_key, load in _cases(stage, config, paths):
            nbytes = _weight_bytes(paths[file_key])
            r: dict[str, Any] = {
                "op": OP,
                "backend": backend,
                "shape": shape,
                "dtype": "fp32",
                "file_dtype": file_dtype,
                "file_bytes": nbytes,
                "read_s": round(reads[file_key], 4),
                "read_gbps": round(nbytes / reads[file_key] / 1e9, 3),
            }
            line = f"{backend:<28} {file_dtype:<5} read {r['read_s']:.3f} s"
            line += f" ({r['read_gbps']:.2f} GB/s)"
            if load is not None:
                r.update(_measure(load, runs))
                r.update(
                    gbps=round(nbytes / r["load_s"] / 1e9, 3),
                    vs_read=round(r["load_s"] / reads[file_key], 3),
                    vs_read_best=round(r["load_min_s"] / reads[file_key], 3),
                )
                line += f"  load {r['load_s']:.3f} s ({r['gbps']:.2f} GB/s, {r['vs_read']:.2f}x"
                line += f" read, {r['load_faults']:.0f} faults)  first sum {r['sum_s']:.3f} s"
                line += f" ({r['sum_faults']:.0f} faults)"
            r.update(common.env_info(cpu))
            print(line)
            common.write_rows([r], OP)
            rows.append(r)
        arena = _arena_rows(numel * 4, runs)
        r = {"op": "arena_alloc", "shape": f"{numel * 4} bytes"}
        r.update({k: round(v, 4) for k, v in arena.items()}, **common.env_info(cpu))
        print("arena alloc+touch s:", {k: round(v, 3) for k, v in arena.items()})
        common.write_rows([r], OP)
        rows.append(r)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def _meta_state(config: UNetConfig) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return StableCascadeUNet(config).state_dict()


if __name__ == "__main__":
    parser = common.bench_parser(__doc__)
    parser.add_argument("--stage", choices=tuple(CONFIGS), default="decoder")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cascade_rt_bench_load"))
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = parser.parse_args()
    main(quick=args.quick, stage=args.stage, root=args.dir, keep=args.keep)
