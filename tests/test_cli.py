"""The `cascade-rt` command line: generate with the built-in random cascade, info, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cascade_rt import cli

FAST = ["--height", "128", "--width", "256", "--prior-steps", "2", "--steps", "2", "-q"]


def test_generate_random_weights_writes_png(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "img.png"
    rc = cli.main(["generate", "a cat", "--random-weights", "tiny", "-o", str(out), *FAST])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "RANDOM weights" in captured.err and "noise" in captured.err
    assert "images/s" in captured.out and "prior" in captured.out
    with Image.open(out) as img:
        assert img.size == (256, 128) and img.mode == "RGB"
    assert [p.name for p in out.parent.iterdir()] == ["img.png"]  # no temp files left
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_num_images_get_numbered_files(tmp_path: Path) -> None:
    out = tmp_path / "img.png"
    rc = cli.main(
        [
            "generate",
            "a cat",
            "--random-weights",
            "tiny",
            "-o",
            str(out),
            "--num-images",
            "2",
            *FAST,
        ]
    )
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img_0.png", "img_1.png"]


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "img.png"

    def broken_save(self, fp, format=None, **kw):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["generate", "a cat", "--random-weights", "tiny", "-o", str(out), *FAST])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "-o", "a.png"], "exactly one of --model PATH or --random-weights SIZE"),
        (["generate", "x", "--random-weights", "tiny", "-o", "a.gif"], "must end in .png"),
        (["generate", "x", "--random-weights", "tiny", "--height", "1000"], "Nearest valid"),
        (["generate", "x", "--model", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    ],
)
def test_errors_exit_2_with_message(args: list[str], message: str, capsys) -> None:
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_info_lists_backends() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "cascade_rt.cli", "info"], capture_output=True, text=True, check=True
    )
    assert "torch" in res.stdout and "vq_lookup" in res.stdout and "extension" in res.stdout
