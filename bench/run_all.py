"""Runs every bench/bench_*.py in one process, so measured peaks are taken once.

    python bench/run_all.py [--quick] [--only vq_lookup] [--only attention ...] [--skip pipeline]

Each bench module has `main(quick: bool = False) -> list[dict]`, which writes its own rows. A bench
that raises is recorded as an error row in run_all.jsonl and the run goes on to the next one.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from pathlib import Path

import common

BENCH_DIR = Path(__file__).resolve().parent


def discover() -> dict[str, Path]:
    """{name: path} for bench/bench_<name>.py, sorted by name."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    benches = discover()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    parser.add_argument(
        "--only", action="append", choices=sorted(benches), help="run only this bench (repeatable)"
    )
    parser.add_argument(
        "--skip", action="append", choices=sorted(benches), help="leave this bench out (repeatable)"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.only or benches if n not in (args.skip or [])]
    print(f"env: {common.env_info()}", flush=True)
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            _load(name, benches[name]).main(quick=args.quick)
        except Exception as exc:  # recorded; the other benches still run
            traceback.print_exc()
            failed.append(name)
            err = traceback.format_exception_only(type(exc), exc)[-1].strip()[:500]
            common.write_rows(
                [{"op": name, "backend": "*", "error": err, **common.env_info()}], "run_all"
            )
        print(f"== {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
