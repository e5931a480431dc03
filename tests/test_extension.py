"""The native extension: built and loaded in this install, and optional at run time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cascade_rt import _ext
from cascade_rt.ops import vq_lookup
from cascade_rt.ops.registry import clear_cache, resolve


@pytest.mark.skipif(
    os.environ.get("CASCADE_RT_ALLOW_NO_EXT") == "1",
    reason="CASCADE_RT_ALLOW_NO_EXT=1: running without the extension on purpose",
)
def test_extension_is_built_and_loaded() -> None:
    assert _ext.available(), f"cascade_rt._C did not load: {_ext.load_error()}"
    assert (
        resolve("vq_lookup", device=torch.device("cpu"), dtype=torch.float32, dim=4).backend
        == "cpp"
    )


def test_everything_falls_back_to_torch_without_extension(monkeypatch, request) -> None:
    request.addfinalizer(clear_cache)  # forget what was resolved without the extension
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_error", "ImportError: simulated")
    clear_cache()
    impl = resolve("vq_lookup", device=torch.device("cpu"), dtype=torch.float32, dim=4)
    assert impl.backend == "torch"
    x, cb = torch.randn(50, 4), torch.randn(16, 4)
    idx, q = vq_lookup(x, cb)
    ref = torch.cdist(x.double(), cb.double()).argmin(1)
    assert torch.equal(idx, ref) and torch.equal(q, cb[ref])


def test_info_reports_missing_extension() -> None:
    # A module finder that refuses cascade_rt._C, as when the build failed or was skipped.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cascade_rt._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from cascade_rt.cli import main\n"
        "main(['info'])\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "not loaded" in res.stdout and "blocked for the test" in res.stdout
    assert "vq_lookup        cpu     runs torch" in res.stdout
