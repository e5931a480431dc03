"""The whole cascade: per-stage milliseconds, images/s and peak memory, random weights.

    python bench/bench_pipeline.py [--quick] [--device cpu|cuda] [--size tiny|lite|big]

Random weights at the released architectures ("lite", "big"; Stage A and the ViT-bigG text
encoder included) time the real work without checkpoints; "tiny" is the small test cascade. On
CUDA the default is "big" at 1024² with the diffusers-documented steps (Stage C 20, Stage B 10,
prior guidance 4, decoder guidance 0) in bfloat16; on CPU, "tiny" at 256² with fewer steps.
One warm-up generation, then the median of `iters` generations per stage.
"""

from __future__ import annotations

import statistics

import common
import torch

from cascade_rt import Cascade

OP = "pipeline"


def _settings(device: torch.device, size: str | None, quick: bool) -> dict:
    if device.type == "cuda":
        return dict(
            size=size or "big",
            height=1024,
            width=1024,
            prior_steps=20,
            steps=10,
            dtype=torch.bfloat16,
            iters=1 if quick else 3,
        )
    return dict(
        size=size or "tiny",
        height=256,
        width=256,
        prior_steps=4 if quick else 10,
        steps=4 if quick else 6,
        dtype=torch.float32,
        iters=1 if quick else 3,
    )


def run(device: torch.device, size: str | None, quick: bool, batch: int) -> dict:
    s = _settings(device, size, quick)
    pipe = Cascade.from_random_weights(s["size"], device=device, dtype=s["dtype"])
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(
        height=s["height"],
        width=s["width"],
        prior_num_inference_steps=s["prior_steps"],
        num_inference_steps=s["steps"],
        prior_guidance_scale=4.0,
        decoder_guidance_scale=0.0,
        num_images_per_prompt=batch,
        output_type="pt",
    )
    pipe("warm-up", **kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [
        pipe(
            "a lighthouse at dusk", generator=torch.Generator().manual_seed(i), **kwargs
        ).timings_ms
        for i in range(s["iters"])
    ]
    stages = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    shape = f"{s['size']} {s['height']}x{s['width']} b{batch} C{s['prior_steps']} B{s['steps']}"
    out = common.row(OP, "default", shape, s["dtype"], device)
    out.update(stage_ms=stages, images_per_s=round(batch / (stages["total"] / 1e3), 4))
    if device.type == "cuda":
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def main(quick: bool = False, device: str | None = None, size: str | None = None) -> list[dict]:
    dev = torch.device(device) if device else common.default_device()
    rows = [run(dev, size, quick, batch) for batch in (1, 2)]
    for r in rows:
        mem = f", peak {r['peak_mem_gib']} GiB" if "peak_mem_gib" in r else ""
        print(
            f"{r['shape']} {r['dtype']} on {r['device']}: {r['stage_ms']} ms, "
            f"{r['images_per_s']} images/s{mem}"
        )
    common.write_rows(rows, OP)
    return rows


if __name__ == "__main__":
    parser = common.bench_parser(__doc__)
    parser.add_argument("--size", choices=["tiny", "lite", "big"])
    a = parser.parse_args()
    main(quick=a.quick, device=a.device, size=a.size)
