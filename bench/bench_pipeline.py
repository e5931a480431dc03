"""The whole cascade, side by side with diffusers: per-stage ms, images/s, host overhead, memory.

    python bench/bench_pipeline.py [--quick] [--device cpu|cuda] [--size tiny|lite|big]
                                   [--no-diffusers] [--no-compile]
    cascade-rt bench [the same flags]

Random weights at the released architectures (the built-in `Cascade.from_random_weights`; Stage
A and the ViT-bigG text encoder included) time the real work without checkpoints, and diffusers'
StableCascadeCombinedPipeline gets the very same weights (bench/diffusers_side.py).

- CUDA (bf16, 1024²): C big + B big at batch 1 and 4 with diffusers' documented settings (Stage C
  20 steps, CFG 4; Stage B 10 steps, no guidance) and with the stability recipe; cascade_rt
  eager and with graphs, in every memory mode; C lite + B lite; diffusers eager (SDPA) and with
  torch.compile of both UNets. Ratios against diffusers are printed.
- CPU (fp32): lite at 256² and 512² against diffusers eager (the issue's CPU target), or the
  tiny cascade with --quick.

One warm-up call (which captures the graphs), then the median of `iters` calls per stage. Rows
go to bench/results/pipeline.jsonl (or $OUT), with a markdown table (pipeline.md) and a PNG bar
chart (pipeline.png) of the run beside them.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
import time
from collections.abc import Callable

import common
import torch
from plot import stacked_bars

from cascade_rt import Cascade

OP = "pipeline"
STAGES = ("text_encoder", "prior", "decoder", "vqgan")


@dataclasses.dataclass(frozen=True)
class Case:
    size: str
    height: int
    width: int
    batch: int
    recipe: str = "diffusers"
    prior_steps: int = 20
    steps: int = 10
    prior_guidance: float = 4.0
    decoder_guidance: float = 0.0
    graphs: bool = False
    memory: str = "resident"

    @property
    def shape(self) -> str:
        return (
            f"{self.size} {self.height}x{self.width} b{self.batch} C{self.prior_steps} "
            f"B{self.steps} {self.recipe}"
        )

    def call_kwargs(self) -> dict:
        return dict(
            height=self.height,
            width=self.width,
            prior_num_inference_steps=self.prior_steps,
            num_inference_steps=self.steps,
            prior_guidance_scale=self.prior_guidance,
            decoder_guidance_scale=self.decoder_guidance,
            num_images_per_prompt=self.batch,
            output_type="pt",
        )


def cases(device: torch.device, size: str | None, quick: bool) -> list[Case]:
    """cascade_rt cases; diffusers runs the `graphs=False, memory=resident` ones of the first
    size at batch 1."""
    if device.type == "cuda":
        big = size or "big"
        out = [
            Case(big, 1024, 1024, 1, graphs=True),
            Case(big, 1024, 1024, 1, graphs=False),
            Case(big, 1024, 1024, 1, graphs=True, memory="sequential"),
            Case(big, 1024, 1024, 1, graphs=True, memory="streaming"),
            Case(big, 1024, 1024, 4, graphs=True),
            Case(big, 1024, 1024, 1, recipe="stability", decoder_guidance=1.1, graphs=True),
        ]
        if size is None:
            out.append(Case("lite", 1024, 1024, 1, graphs=True))
        return out[:4] if quick else out
    if quick:
        return [Case(size or "tiny", 256, 256, 1, prior_steps=6, steps=4)]
    return [Case(size or "lite", s, s, 1) for s in (256, 512)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return None


def _median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_ours(case: Case, device: torch.device, dtype: torch.dtype, iters: int) -> dict:
    t0 = time.perf_counter()
    pipe = Cascade.from_random_weights(
        case.size, device=device, dtype=dtype, graphs=case.graphs, memory=case.memory
    )
    build_s = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    kwargs = case.call_kwargs()
    gen = torch.Generator(device).manual_seed(0)
    t0 = time.perf_counter()
    pipe("warm-up", generator=gen, **kwargs)  # captures the graphs
    _sync(device)
    first_s = time.perf_counter() - t0
    _reset_peak(device)
    prompt = "a lighthouse at dusk"
    outs = [pipe(prompt, generator=gen.manual_seed(i), **kwargs) for i in range(iters)]
    stages = _median_stages([o.timings_ms for o in outs])
    r = common.row(OP, _backend(case), case.shape, dtype, device)
    r.update(
        impl="cascade_rt",
        graphs=case.graphs,
        memory=case.memory,
        stage_ms=stages,
        images_per_s=round(case.batch / (stages["total"] / 1e3), 4),
        host_ms=_median_stages([o.host_ms for o in outs]),
        first_call_s=round(first_s, 3),
        build_s=round(build_s, 3),
        weights_gib=round(pipe.weight_bytes() / 2**30, 3),
        memory_report=pipe.memory_report(),
        graph_cache_mib=round(pipe.graph_cache_info().nbytes / 2**20, 1),
    )
    if (peak := _peak_gib(device)) is not None:
        r["peak_mem_gib"] = peak
    else:  # the CPU: this process' peak RSS, which includes every earlier case's
        r["peak_rss_gib"] = round(r["memory_report"]["peak_bytes"] / 2**30, 3)
    del pipe, outs
    _free(device)
    return r


def _backend(case: Case) -> str:
    mode = "graphs" if case.graphs else "eager"
    return f"cascade_rt {mode}" + ("" if case.memory == "resident" else f" {case.memory}")


def run_diffusers(
    case: Case, device: torch.device, dtype: torch.dtype, iters: int, compiled: bool
) -> dict:
    import diffusers_side

    pipe, ours = diffusers_side.build_diffusers_pipeline(case.size, device, dtype)
    del ours  # diffusers' modules hold the shared weights
    timing = diffusers_side.time_diffusers(
        pipe,
        prompt="a lighthouse at dusk",
        height=case.height,
        width=case.width,
        prior_steps=case.prior_steps,
        steps=case.steps,
        prior_guidance=case.prior_guidance,
        decoder_guidance=case.decoder_guidance,
        batch=case.batch,
        compile=compiled,
        iters=iters,
    )
    name = "diffusers compile" if compiled else "diffusers eager"
    r = common.row(OP, name, case.shape, dtype, device)
    # diffusers' "prior" stage includes its prompt encoding (its prior pipeline does both).
    r.update(
        impl="diffusers",
        compile=compiled,
        stage_ms={**timing["stages_ms"], "total": timing["total_ms"]},
        images_per_s=timing["images_per_s"],
        iters=timing["iters"],
    )
    if (peak := _peak_gib(device)) is not None:
        r["peak_mem_gib"] = peak
    del pipe
    _free(device)
    return r


def _guarded(fn: Callable[[], dict], case: Case, name: str, device, dtype) -> dict:
    """A failing configuration becomes an error row; the other rows are still measured."""
    try:
        return fn()
    except Exception as exc:  # recorded, never fatal
        msg = f"{type(exc).__name__}: {exc}"[:500]
        print(f"{name} {case.shape}: FAILED {msg}", file=sys.stderr, flush=True)
        return common.row(OP, name, case.shape, dtype, device, error=msg)


def markdown(rows: list[dict]) -> str:
    """One line per row, with the speedup against diffusers eager of the same shape."""
    base = {
        r["shape"]: r["stage_ms"]["total"]
        for r in rows
        if r.get("backend") == "diffusers eager" and "stage_ms" in r
    }
    lines = [
        "| backend | shape | dtype | text ms | C ms (diffusers: + text) | B ms | A ms | total ms "
        "| images/s | host ms/stage | peak GiB | vs diffusers eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            err = r["error"][:80].replace("|", "/")
            lines.append(f"| {r['backend']} | {r['shape']} | {r['dtype']} | error: {err} |")
            continue
        s = r["stage_ms"]
        host = r.get("host_ms") or {}
        # Per stage call: drawing its noise plus filling and launching its graph.
        per_call = [host[k] + host.get(f"{k}_noise", 0.0) for k in STAGES if k in host]
        host_max = f"{max(per_call):.2f}" if per_call and r.get("graphs") else "-"
        ratio = f"{base[r['shape']] / s['total']:.2f}×" if r["shape"] in base else "-"
        cells = [s.get(k) for k in STAGES]
        stage_cells = " | ".join("-" if v is None else f"{v:,.1f}" for v in cells)
        lines.append(
            f"| {r['backend']} | {r['shape']} | {r['dtype']} | {stage_cells} | "
            f"{s['total']:,.1f} | {r['images_per_s']} | {host_max} | "
            f"{_peak_cell(r)} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def _peak_cell(r: dict) -> str:
    if "peak_mem_gib" in r:
        return str(r["peak_mem_gib"])
    return f"RSS {r['peak_rss_gib']}" if "peak_rss_gib" in r else "-"


def main(
    quick: bool = False,
    device: str | None = None,
    size: str | None = None,
    with_diffusers: bool = True,
    with_compile: bool = True,
    iters: int | None = None,
) -> list[dict]:
    dev = torch.device(device) if device else common.default_device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    iters = iters or (1 if quick else 3)
    rows: list[dict] = []
    all_cases = cases(dev, size, quick)
    for case in all_cases:
        name = _backend(case)
        _emit(_guarded(lambda c=case: run_ours(c, dev, dtype, iters), case, name, dev, dtype), rows)
    if with_diffusers:
        # Same shapes as the cascade_rt rows it is compared with: on CUDA the first batch-1
        # diffusers-recipe case, on the CPU every case.
        refs = [c for c in all_cases if c.batch == 1 and c.recipe == "diffusers"]
        refs = list(
            dict.fromkeys(dataclasses.replace(c, graphs=False, memory="resident") for c in refs)
        )
        compiles = [False, True] if with_compile and dev.type == "cuda" else [False]
        for case in refs[:1] if dev.type == "cuda" else refs:
            for compiled in compiles:
                name = "diffusers compile" if compiled else "diffusers eager"
                fn = lambda c=case, k=compiled: run_diffusers(c, dev, dtype, iters, k)  # noqa: E731
                _emit(_guarded(fn, case, name, dev, dtype), rows)
    _report(rows)
    return rows


def _emit(r: dict, rows: list[dict]) -> None:
    """Prints and appends the row at once, so a run cut short keeps what it measured."""
    if "error" not in r:
        print(
            f"{r['backend']:<28} {r['shape']:<40} {r['stage_ms']} ms, "
            f"{r['images_per_s']} images/s, peak {r.get('peak_mem_gib', '-')} GiB",
            flush=True,
        )
    common.write_rows([r], OP)
    rows.append(r)


def _report(rows: list[dict]) -> None:
    """The markdown table and the bar chart of this run, beside the JSON rows."""
    out_dir = common.results_path(OP).parent
    table = markdown(rows)
    print(table)
    md = out_dir / f"{OP}.md"
    tmp = md.with_suffix(".tmp")
    header = f"# {OP} on {rows[0]['device']} at {rows[0]['commit']} (torch {rows[0]['torch']})\n\n"
    tmp.write_text(header + table)
    tmp.replace(md)
    ok = [r for r in rows if "stage_ms" in r]
    if ok:
        stacked_bars(
            out_dir / f"{OP}.png",
            f"Stable Cascade per stage, {ok[0]['dtype']} on {ok[0]['device']} ({ok[0]['commit']})",
            [f"{r['backend']} | {r['shape']}" for r in ok],
            [{k: r["stage_ms"].get(k, 0.0) for k in STAGES} for r in ok],
        )


if __name__ == "__main__":
    parser = common.bench_parser(__doc__)
    parser.add_argument("--size", choices=["tiny", "lite", "big"])
    parser.add_argument("--no-diffusers", action="store_true", help="time cascade_rt only")
    parser.add_argument("--no-compile", action="store_true", help="skip diffusers + compile")
    parser.add_argument("--iters", type=int, help="timed calls per case (default 3, quick 1)")
    a = parser.parse_args()
    main(a.quick, a.device, a.size, not a.no_diffusers, not a.no_compile, a.iters)
    sys.exit(0)
