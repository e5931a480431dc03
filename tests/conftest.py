"""Shared fixtures. The tiny reference cascade is built once per session (a few seconds).

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, before any test module loads.
Models never pick the interpreter on their own (see cascade_rt/ops/registry.py); kernel tests ask
for backend="triton" explicitly.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from reference_pipeline import TinyCheckpoints, build_tiny_checkpoints


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny_cascade"))
