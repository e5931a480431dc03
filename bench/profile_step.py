"""Where one Stage C step and one Stage B step spend their time, by op kind (torch.profiler).

    python bench/profile_step.py [--device cpu|cuda] [--size lite|big] [--res 1024]

Random weights at the released architectures. Prints the top ops by self time for one guided
(batch 2) forward of each stage and writes one JSON row per (stage, op) to profile_step.jsonl,
so the kernel choices in NOTES.md rest on a measured breakdown.
"""

from __future__ import annotations

import os

import common
import torch
from torch.profiler import ProfilerActivity, profile

from cascade_rt.models.unet import STAGE_B, STAGE_B_LITE, STAGE_C, STAGE_C_LITE, StableCascadeUNet
from cascade_rt.ops.registry import PROFILE_VAR
from cascade_rt.random_weights import randomize_
from cascade_rt.resolution import latent_sizes

OP = "profile_step"
TOP = 12


def _model(config, device: torch.device, dtype: torch.dtype) -> StableCascadeUNet:
    with torch.device("meta"):
        model = StableCascadeUNet(config)
    return randomize_(model.to(dtype=dtype).to_empty(device=device), seed=0).eval()


def _inputs(stage: str, config, res: int, device: torch.device, dtype: torch.dtype) -> dict:
    sizes = latent_sizes(res, res)
    b = 2  # a guided step runs cond and uncond together

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    r = torch.full((b,), 0.5, device=device)
    if stage == "C":
        return dict(
            sample=rnd(b, 16, *sizes.stage_c),
            timestep_ratio=r,
            clip_text_pooled=rnd(b, 1, config.clip_text_pooled_in_channels),
            clip_text=rnd(b, 77, config.clip_text_in_channels),
            clip_img=rnd(b, 1, config.clip_image_in_channels),
        )
    return dict(
        sample=rnd(b, 4, *sizes.stage_b),
        timestep_ratio=r,
        clip_text_pooled=rnd(b, 1, config.clip_text_pooled_in_channels),
        effnet=rnd(b, 16, *sizes.stage_c),
    )


def profile_stage(
    stage: str, config, res: int, device: torch.device, dtype: torch.dtype
) -> list[dict]:
    model = _model(config, device, dtype)
    inputs = _inputs(stage, config, res, device, dtype)
    with torch.inference_mode():
        model(**inputs)  # warm-up
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else []
        )
        with profile(activities=activities) as prof:
            model(**inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    rows = []
    label = f"stage {stage} {res}x{res} b2"
    print(f"{label}: {total / 1e3:.1f} ms of {'device' if device.type == 'cuda' else 'CPU'} time")
    for e in events[:TOP]:
        us = getattr(e, attr)
        row = common.row(OP, e.key, label, dtype, device)
        row.update(us=round(us, 1), share_pct=round(100 * us / total, 1), calls=e.count)
        rows.append(row)
        print(f"  {e.key:<48} {us / 1e3:9.2f} ms {100 * us / total:5.1f} %  x{e.count}")
    return rows


def main(
    quick: bool = False, device: str | None = None, size: str | None = None, res: int | None = None
) -> list[dict]:
    os.environ[PROFILE_VAR] = "1"  # name cascade_rt's own kernels in the trace
    dev = torch.device(device) if device else common.default_device()
    cuda = dev.type == "cuda"
    size = size or ("big" if cuda else "lite")
    res = res or (1024 if cuda else 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    configs = {
        "C": STAGE_C if size == "big" else STAGE_C_LITE,
        "B": STAGE_B if size == "big" else STAGE_B_LITE,
    }
    rows = []
    for stage, config in configs.items():
        rows += profile_stage(stage, config, res, dev, dtype)
        if cuda:
            torch.cuda.empty_cache()
    common.write_rows(rows, OP)
    return rows


if __name__ == "__main__":
    parser = common.bench_parser(__doc__)
    parser.add_argument("--size", choices=("lite", "big"))
    parser.add_argument("--res", type=int)
    a = parser.parse_args()
    main(quick=a.quick, device=a.device, size=a.size, res=a.res)
