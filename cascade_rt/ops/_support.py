"""Where each non-reference backend can run; the `supports` predicates of the ops build on these.

- cuda: the extension was built with CUDA, has the op's launcher, and the tensors are on a GPU.
- cpp: the extension is loaded, has the op's launcher, and the tensors are on the CPU.
- triton: triton is installed and the tensors are on a GPU, or on the CPU while
  TRITON_INTERPRET=1 (Triton's interpreter: how the tests check the kernels off-GPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from cascade_rt import _ext


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def cuda_runs(device: torch.device, launcher: str) -> bool:
    return device.type == "cuda" and _ext.has_cuda() and hasattr(_ext.native(), launcher)


def cpp_runs(device: torch.device, launcher: str) -> bool:
    return device.type == "cpu" and hasattr(_ext.native(), launcher)


def triton_runs(device: torch.device) -> bool:
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpreted) and has_triton()


def ptr(t: torch.Tensor | None) -> int:
    """Address for a native launcher; 0 (a null pointer) for an absent optional tensor."""
    return 0 if t is None else t.data_ptr()
