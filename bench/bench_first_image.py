"""Time to first image: load a saved cascade and make one image, cascade_rt against diffusers.

    python bench/bench_first_image.py [--quick] [--size lite|tiny] [--dir /tmp/...] [--keep]

The random-weight cascade of `--size` is saved once by diffusers' own
`StableCascadeCombinedPipeline.save_pretrained` (the layout users download), every file is read
once so the page cache is warm, and then each side runs in a fresh process: `from_pretrained`
of that folder (fp32, CPU or the bench device), then one generation (Stage C 20 steps with
guidance 4, Stage B 10 steps, 256², or 4 + 2 steps with --quick). The row has the load seconds,
the generation seconds and their sum, per side, and the ratio.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import common
import torch

OP = "first_image"
CALL = dict(height=256, width=256, prior_guidance_scale=4.0, decoder_guidance_scale=0.0)

_CHILD = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    side, root, device, prior_steps, steps = sys.argv[1:6]
    call = json.loads(sys.argv[6])
    if side == "cascade_rt":
        from cascade_rt import Cascade
        pipe = Cascade.from_pretrained(root, device=device, dtype=torch.float32)
    else:
        # diffusers 0.42 keeps PaellaVQModel among its deprecated pipelines, where the combined
        # pipeline's from_pretrained cannot resolve it: the components are loaded one by one
        # and assembled, as users of this release have to.
        from diffusers import (
            DDPMWuerstchenScheduler, StableCascadeCombinedPipeline, StableCascadeUNet
        )
        from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizerFast
        f32 = dict(dtype=torch.float32)
        te = CLIPTextModelWithProjection.from_pretrained(f"{root}/text_encoder", **f32)
        tok = CLIPTokenizerFast.from_pretrained(f"{root}/tokenizer")
        pipe = StableCascadeCombinedPipeline(
            tokenizer=tok,
            text_encoder=te,
            decoder=StableCascadeUNet.from_pretrained(f"{root}/decoder", **f32),
            scheduler=DDPMWuerstchenScheduler.from_pretrained(f"{root}/scheduler"),
            vqgan=PaellaVQModel.from_pretrained(f"{root}/vqgan", **f32),
            prior_prior=StableCascadeUNet.from_pretrained(f"{root}/prior_prior", **f32),
            prior_text_encoder=te,
            prior_tokenizer=tok,
            prior_scheduler=DDPMWuerstchenScheduler.from_pretrained(f"{root}/prior_scheduler"),
        )
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    t1 = time.perf_counter()
    pipe("a lighthouse at dusk", prior_num_inference_steps=int(prior_steps),
         num_inference_steps=int(steps), generator=torch.Generator().manual_seed(0),
         output_type="pt", **call)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    print(json.dumps({"import_load_s": t1 - t0, "generate_s": t2 - t1}))
    """
)


def _save(size: str, root: Path, device: torch.device) -> int:
    """Saves the random cascade with diffusers' save_pretrained; returns the bytes written."""
    import diffusers_side

    pipe, ours = diffusers_side.build_diffusers_pipeline(size, "cpu", torch.float32)
    del ours
    for module in (pipe.prior_prior, pipe.decoder, pipe.vqgan, pipe.text_encoder):
        for p in module.parameters():
            # diffusers' to_q/to_k/to_v are row views of our fused in_proj: safetensors refuses
            # to write tensors that share memory, so each view gets its own storage.
            if p.untyped_storage().nbytes() != p.numel() * p.element_size():
                p.data = p.data.clone()
    pipe.save_pretrained(root)
    return sum(f.stat().st_size for f in root.rglob("*.safetensors"))


def _warm(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with f.open("rb") as fh:
                while fh.read(64 << 20):
                    pass


def _run(side: str, root: Path, device: torch.device, prior_steps: int, steps: int) -> dict:
    args = [sys.executable, "-c", _CHILD, side, str(root), str(device), str(prior_steps)]
    args += [str(steps), json.dumps(CALL)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{side} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(
    quick: bool = False,
    device: str | None = None,
    size: str = "lite",
    root: Path = Path("/tmp/cascade_rt_bench_first_image"),
    keep: bool = False,
) -> list[dict]:
    dev = torch.device(device) if device else common.default_device()
    prior_steps, steps = (4, 2) if quick else (20, 10)
    shutil.rmtree(root, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        nbytes = _save(size, root, dev)
        print(f"saved {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", flush=True)
        _warm(root)
        sides = {
            side: _run(side, root, dev, prior_steps, steps) for side in ("cascade_rt", "diffusers")
        }
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    shape = (
        f"{size} {CALL['height']}x{CALL['width']} C{prior_steps} B{steps}, {nbytes / 1e9:.2f} GB"
    )
    r = common.row(OP, "cascade_rt vs diffusers", shape, torch.float32, dev)
    for side, t in sides.items():
        r[side] = {k: round(v, 3) for k, v in t.items()} | {
            "first_image_s": round(t["import_load_s"] + t["generate_s"], 3)
        }
    r["speedup"] = round(r["diffusers"]["first_image_s"] / r["cascade_rt"]["first_image_s"], 3)
    print(json.dumps(r, indent=1))
    common.write_rows([r], OP)
    return [r]


if __name__ == "__main__":
    parser = common.bench_parser(__doc__)
    parser.add_argument("--size", choices=["tiny", "lite"], default="lite")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/cascade_rt_bench_first_image"))
    parser.add_argument("--keep", action="store_true", help="keep the saved folder")
    a = parser.parse_args()
    main(a.quick, a.device, a.size, a.dir, a.keep)
