"""Loads the native extension `cascade_rt._C` if it was built and imports cleanly.

Everything in cascade_rt works without it (the torch reference ops); `available()` and
`load_error()` say which case holds, and `cascade-rt info` prints them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

# Element type tags shared with csrc/cascade_rt.h.
DTYPE_TAGS: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_module: ModuleType | None = None
_error: str | None = None
_tried = False


def native() -> ModuleType | None:
    """The extension module, or None when it is absent or failed to load."""
    global _module, _error, _tried
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("cascade_rt._C")
        except Exception as exc:  # any import failure means: fall back to torch
            _error = f"{type(exc).__name__}: {exc}"
    return _module


def available() -> bool:
    return native() is not None


def has_cuda() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    mod = native()
    return bool(mod is not None and getattr(mod, "with_cuda", False))


def load_error() -> str | None:
    native()
    return _error


def stream_handle(device: torch.device) -> int:
    """Raw cudaStream_t of the current stream, so launches land in a capturing graph."""
    return torch.cuda.current_stream(device).cuda_stream
