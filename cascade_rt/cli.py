"""`cascade-rt` command line: generate images, and report versions, devices and live kernels."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

import cascade_rt


def _save_atomically(image, path: Path) -> None:
    """Writes to a temporary file beside `path`, then renames: no half-written image on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format=fmt)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _output_paths(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(count)]


def _generate(args: argparse.Namespace) -> int:
    from cascade_rt.pipeline import Cascade

    if (args.model is None) == (args.random_weights is None):
        print("error: give exactly one of --model PATH or --random-weights SIZE", file=sys.stderr)
        return 2
    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        print(f"error: output {out} must end in .png, .jpg, .jpeg or .webp", file=sys.stderr)
        return 2
    if args.random_weights is not None:
        print(
            f"note: running the built-in '{args.random_weights}' cascade with RANDOM weights: it "
            "exercises the whole path, but its pictures are noise. Use --model PATH for real "
            "images.",
            file=sys.stderr,
        )
        pipe = Cascade.from_random_weights(
            args.random_weights,
            device=args.device,
            dtype=args.dtype,
            seed=args.seed,
            recipe=args.recipe,
            graphs=args.graphs,
            memory="resident" if args.memory == "auto" else args.memory,
        )
    else:
        pipe = Cascade.from_pretrained(
            args.model,
            decoder_path=args.decoder,
            device=args.device,
            dtype=args.dtype,
            variant=args.variant,
            prior_lite=args.lite,
            decoder_lite=args.lite,
            recipe=args.recipe,
            graphs=args.graphs,
            memory=args.memory,
        )
    pipe.set_progress_bar_config(disable=args.quiet)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    result = pipe(
        args.prompt,
        height=args.height,
        width=args.width,
        prior_num_inference_steps=args.prior_steps,
        prior_guidance_scale=args.prior_guidance,
        num_inference_steps=args.steps,
        decoder_guidance_scale=args.decoder_guidance,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        generator=generator,
    )
    paths = _output_paths(out, len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        _save_atomically(image, path)
    t = result.timings_ms
    stages = "  ".join(f"{k} {v:.1f} ms" for k, v in t.items() if k != "total")
    print(f"wrote {', '.join(str(p) for p in paths)}")
    print(f"device {pipe.device} dtype {str(pipe.dtype).removeprefix('torch.')}: {stages}")
    line = f"total {t['total']:.1f} ms, {len(paths) / (t['total'] / 1e3):.3f} images/s"
    report = pipe.memory_report()
    line += f", memory {report['mode']}, peak {report['peak_bytes'] / 2**30:.2f} GiB"
    line += f" ({report['peak_kind']})"
    print(line)
    return 0


def _info(_: argparse.Namespace) -> int:
    from cascade_rt import _ext
    from cascade_rt.ops import registry

    print(
        f"cascade_rt {cascade_rt.__version__}  python {platform.python_version()}  "
        f"torch {torch.__version__}"
    )
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    devices = [torch.device("cpu")]
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
            devices.append(torch.device("cuda", i))
    else:
        print("cuda: not available")
    if _ext.available():
        cuda = "built" if _ext.has_cuda() else "not built"
        print(f"extension cascade_rt._C: loaded (CUDA kernels {cuda})")
    else:
        print(
            f"extension cascade_rt._C: not loaded ({_ext.load_error()}); torch reference ops in use"
        )
    forced = registry.forced()
    setting = f"{registry.ENV_VAR}={','.join(forced)}" if forced else f"{registry.ENV_VAR} unset"
    print(f"backend each op runs on, per device ({setting}; 'live': all that can run, in order):")
    for op in registry.ops():
        for dev in devices:
            live = registry.live_backends(op, dev)
            picks = [registry.selected(op, dev, dt) for dt in (torch.bfloat16, torch.float32)]
            (bf16, _), (fp32, _) = picks
            runs = bf16 if bf16 == fp32 else f"{bf16} (bf16) / {fp32} (fp32)"
            print(f"  {op:<16} {dev!s:<7} runs {runs:<12} live: {', '.join(live) or '-'}")
            for reason in dict.fromkeys(r for _, r in picks if r is not None):
                print(f"      note: {reason}")
    return 0


def _bench(bench_args: list[str]) -> int:
    """Runs bench/bench_pipeline.py of the source checkout this package was installed from."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_pipeline.py"
    if not script.is_file():
        print(
            f"error: cascade-rt bench runs {script.name} from the source checkout's bench/ "
            f"folder, which is not beside this installed package ({script.parent} is missing); "
            "install from a checkout with `pip install -e .`",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(script.parent))
    argv, sys.argv = sys.argv, [str(script), *bench_args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0)
    finally:
        sys.argv = argv
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cascade-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text to image")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="checkpoint folder or file (any supported layout)")
    gen.add_argument("--decoder", help="separate folder holding Stage B and Stage A")
    gen.add_argument(
        "--random-weights",
        choices=["tiny", "lite", "big"],
        help="run a built-in random-weight cascade: tiny, or the lite/big architectures for "
        "benchmarks (its pictures are noise)",
    )
    gen.add_argument("-o", "--output", default="out.png")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--prior-steps", type=int, help="Stage C steps")
    gen.add_argument("--prior-guidance", type=float, help="Stage C guidance scale")
    gen.add_argument("--steps", type=int, help="Stage B steps")
    gen.add_argument("--decoder-guidance", type=float, help="Stage B guidance scale")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--num-images", type=int, default=1)
    gen.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--variant", help="checkpoint variant, e.g. bf16")
    gen.add_argument("--lite", action="store_true", help="use the lite Stage C and Stage B")
    gen.add_argument("--recipe", choices=["diffusers", "stability"], default="diffusers")
    gen.add_argument(
        "--memory",
        choices=["auto", "resident", "sequential", "streaming"],
        default="auto",
        help="where the weights live: all on the device, only the running stage's, or Stage B/C "
        "blocks streamed through a few buffers (default: picked from free memory)",
    )
    gen.add_argument(
        "--no-graphs",
        dest="graphs",
        action="store_const",
        const=False,
        default=None,
        help="run eagerly instead of replaying CUDA graphs (graphs are on by default on CUDA)",
    )
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    gen.set_defaults(func=_generate)
    info = sub.add_parser("info", help="versions, devices and live kernel backends")
    info.set_defaults(func=_info)
    # Listed for --help; main() hands everything after `bench` to the bench's own parser.
    sub.add_parser("bench", help="the pipeline benchmark against diffusers (see bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
