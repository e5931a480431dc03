"""Shared benchmark helpers: environment facts, timing, measured device peaks, JSON result rows.

Every bench/bench_<op>.py imports this module as `common` (bench/ is on sys.path both when a bench
runs alone, `python bench/bench_vq_lookup.py`, and under `python bench/run_all.py`).

Method (bench/NOTES.md): warm-up runs first, then `iters` timed runs, each after an L2 flush
(a 256 MiB buffer write on GPU, 64 MiB on CPU, both larger than the last-level cache), and the
median is reported with p10/p90. Peaks are measured on the machine, not read from a datasheet:
the best of several runs of a device-to-device copy for bandwidth and of a large matmul per dtype
for compute.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
SHORT_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Bigger than the L2 of H100 (50 MB) and H200 (60 MB), and than one CCD's L3 on a server CPU.
_FLUSH_BYTES = {"cuda": 256 << 20, "cpu": 64 << 20}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3', or the CPU model and the threads torch uses."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.get_num_threads()} threads)"


@functools.cache
def _commit() -> str:
    # A lent GPU machine gets a copy of the tree without .git: the caller passes the hash in.
    if os.environ.get("CASCADE_RT_COMMIT"):
        return os.environ["CASCADE_RT_COMMIT"]
    try:

        def git(*args: str) -> str:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()

        sha = git("rev-parse", "--short", "HEAD")
        return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(dist: str) -> str | None:
    # From package metadata, so importing this module never imports (and configures) triton.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """Device, commit (short hash, '+dirty' when tracked files changed) and library versions."""
    return {
        "device": device_name(device),
        "commit": _commit(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
    }


@functools.cache
def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(_FLUSH_BYTES[device.type], dtype=torch.int8, device=device)


def _percentile(sorted_vals: list[float], q: float) -> float:
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def time_us(
    fn: Callable[[], object],
    *,
    warmup: int = 10,
    iters: int = 50,
    flush_l2: bool = True,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Median, p10, p90 and min of `iters` runs of `fn()` in microseconds.

    On CUDA each run sits between two events and the host syncs once at the end; the L2 flush
    is queued before the start event, so it is not timed. On CPU each run is timed with
    perf_counter (CPU ops return when done).
    """
    device = torch.device(device) if device is not None else default_device()
    flush = _flush_buffer(device) if flush_l2 else None
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(iters)
        ]
        for start, end in events:
            if flush is not None:
                flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) * 1e3 for start, end in events]
    else:
        for _ in range(iters):
            if flush is not None:
                flush.zero_()
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return {
        "min_us": samples[0],
        "median_us": _percentile(samples, 0.5),
        "p10_us": _percentile(samples, 0.1),
        "p90_us": _percentile(samples, 0.9),
    }


@functools.cache
def _copy_gbps(device: torch.device) -> float:
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes, dtype=torch.int8, device=device).fill_(1)
    dst = torch.empty_like(src)
    iters = 20 if device.type == "cuda" else 10
    t = time_us(lambda: dst.copy_(src), warmup=3, iters=iters, flush_l2=False, device=device)
    # The best run is the peak: on a shared CPU the median measures the neighbours too.
    return 2 * nbytes / t["min_us"] / 1e3  # bytes read + bytes written


def measured_copy_gbps(device: torch.device | str | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), best of several runs, measured
    once per process."""
    return _copy_gbps(torch.device(device) if device is not None else default_device())


@functools.cache
def _matmul_tflops(dtype: torch.dtype, device: torch.device) -> float:
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    iters = 20 if device.type == "cuda" else 10
    t = time_us(lambda: a @ b, warmup=3, iters=iters, flush_l2=False, device=device)
    return 2 * n**3 / t["min_us"] / 1e6


def peak_tflops(
    dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None
) -> float:
    """Dense matmul throughput (TFLOP/s) at `dtype` with torch's default settings (fp32 without
    TF32), best of several runs, measured once per process."""
    return _matmul_tflops(dtype, torch.device(device) if device is not None else default_device())


def row(
    op: str,
    backend: str,
    shape: str,
    dtype: torch.dtype,
    device: torch.device,
    timing: dict[str, float] | None = None,
    *,
    nbytes: int | None = None,
    flops: int | None = None,
    peak_dtype: torch.dtype | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """One result row. With `flops` and `peak_dtype`, pct_of_peak is against the measured matmul
    peak at that dtype; otherwise, with `nbytes`, against the measured copy bandwidth."""
    r: dict[str, Any] = {"op": op, "backend": backend, "shape": shape, "dtype": SHORT_DTYPE[dtype]}
    if timing is not None:
        us = timing["median_us"]
        r.update(
            us=round(us, 3), p10_us=round(timing["p10_us"], 3), p90_us=round(timing["p90_us"], 3)
        )
        if nbytes is not None:
            r["gbps"] = round(nbytes / us / 1e3, 3)
        if flops is not None:
            r["tflops"] = round(flops / us / 1e6, 4)
        if flops is not None and peak_dtype is not None:
            r["pct_of_peak"] = round(100 * r["tflops"] / peak_tflops(peak_dtype, device), 1)
        elif nbytes is not None:
            r["pct_of_peak"] = round(100 * r["gbps"] / measured_copy_gbps(device), 1)
    if error is not None:
        r["error"] = error
    r.update(env_info(device))
    return r


def measure(
    op: str,
    backend: str,
    shape: str,
    dtype: torch.dtype,
    device: torch.device,
    fn: Callable[[], object],
    *,
    warmup: int = 10,
    iters: int = 50,
    **row_kwargs: Any,
) -> dict[str, Any]:
    """Times `fn` and returns its row; a failure becomes a row with `error`, never an exception,
    so one broken backend does not stop the others."""
    try:
        timing = time_us(fn, warmup=warmup, iters=iters, device=device)
    except Exception as exc:  # recorded in the row: the run goes on
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return row(op, backend, shape, dtype, device, error=last[:500])
    return row(op, backend, shape, dtype, device, timing, **row_kwargs)


def results_path(name: str) -> Path:
    """$OUT/<name>.jsonl when $OUT is set (a lent GPU machine), else bench/results/<name>.jsonl."""
    base = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    return base / f"{name}.jsonl"


def write_rows(rows: list[dict[str, Any]], name: str) -> Path:
    """Appends `rows` as JSON lines and returns the file written."""
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=False) + "\n")
    return path


def print_rows(rows: list[dict[str, Any]]) -> None:
    """A short table: one line per row."""
    for r in rows:
        if "error" in r:
            figure = f"ERROR {r['error']}"
        else:
            rate = f"{r['tflops']:.3f} TFLOP/s" if "tflops" in r else f"{r.get('gbps', 0):.1f} GB/s"
            pct = f" ({r['pct_of_peak']:.1f}% of peak)" if "pct_of_peak" in r else ""
            figure = f"{r['us']:>12.1f} us  {rate}{pct}"
        print(f"{r['op']:<16} {r['backend']:<22} {r['dtype']:<5} {r['shape']:<28} {figure}")


def emit(r: dict[str, Any], op: str, rows: list[dict[str, Any]]) -> None:
    """Prints and appends one row right away, so a run cut short by a time limit keeps what it
    measured, and collects it in `rows`."""
    print_rows([r])
    write_rows([r], op)
    rows.append(r)


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every bench takes (--quick, --device); a bench may add its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    return parser
