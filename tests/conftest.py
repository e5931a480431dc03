"""Shared fixtures. The tiny reference cascade is built once per session (a few seconds)."""

from __future__ import annotations

import pytest
from reference_pipeline import TinyCheckpoints, build_tiny_checkpoints


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoints:
    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny_cascade"))
