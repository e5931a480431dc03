"""The memory modes, how "auto" picks one, and the memory readings the planner reports.

- resident:   every stage's weights on the device.
- sequential: one device region sized for the largest swapped stage; the running stage is
              copied in when entered (Stage A, `KEEP_RESIDENT`, stays resident).
- streaming:  Stage B/C blocks and text-encoder layers flow through a few fixed device slots
              while they run; everything else stays resident.

"auto" compares free memory (CUDA: `torch.cuda.mem_get_info`; CPU: MemAvailable of
/proc/meminfo) with what each mode needs, weights plus `ACTIVATION_ALLOWANCE`, and takes the
first that fits in the order resident, sequential, streaming. On the CPU streaming saves no
memory (the host copy is RAM too), so auto stops at sequential there. On CUDA the host RAM the
pinned copies take (every swapped or streamed stage) is not checked.
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from pathlib import Path

import torch

MODES = ("resident", "sequential", "streaming")
REQUESTS = ("auto", *MODES)
STAGE_NAMES = ("text_encoder", "prior", "decoder", "vqgan")
KEEP_RESIDENT = ("vqgan",)  # Stage A: 20M parameters, not worth a region swap per image
# Activations, workspaces and allocator slack of the largest stage call: Stage B at 1024x1024
# with guidance (batch 2) keeps a few [2, 320, 256, 256] bf16 tensors (84 MB each) alive,
# cuBLAS/attention workspaces add a few hundred MB. 4 GiB leaves room for fp32 and batch 4.
ACTIVATION_ALLOWANCE = 4 << 30
_GIB = float(1 << 30)


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation can take now: free device memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line; pass the free memory explicitly")


def peak_bytes(device: torch.device) -> tuple[int, str]:
    """(peak, what it measures): the CUDA allocator's peak on CUDA, else this process' peak
    resident set size. VmHWM first: ru_maxrss keeps the pre-exec maximum, so a process spawned
    from a big parent reports the parent's size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS (VmHWM)"
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (ru_maxrss)"


def _gib(n: int) -> str:
    return f"{n / _GIB:.2f} GiB"


def check_request(requested: str) -> None:
    if requested not in REQUESTS:
        raise ValueError(f"unknown memory mode {requested!r}; choose one of {', '.join(REQUESTS)}")


def choose_mode(
    requested: str,
    device: torch.device,
    stage_bytes: Mapping[str, int],
    *,
    free: int | None = None,
) -> tuple[str, str]:
    """(mode, reason). An explicit mode is returned as is; "auto" picks from `free` (read from
    the device when None) against each mode's need, as the module docstring says."""
    check_request(requested)
    if requested != "auto":
        return requested, f"{requested} was requested"
    if not stage_bytes:
        raise ValueError("choose_mode: no stages given")
    device = torch.device(device)
    free = free_bytes(device) if free is None else free
    kept = sum(n for name, n in stage_bytes.items() if name in KEEP_RESIDENT)
    swapped = {name: n for name, n in stage_bytes.items() if name not in KEEP_RESIDENT}
    largest = max(swapped, key=swapped.__getitem__, default=None)
    resident = sum(stage_bytes.values()) + ACTIVATION_ALLOWANCE
    sequential = kept + (swapped[largest] if largest else 0) + ACTIVATION_ALLOWANCE
    where = f"{_gib(free)} free on {device}"
    if resident <= free:
        return "resident", f"auto: all weights + activations need {_gib(resident)}, {where}"
    parts = ", ".join(
        [f"largest stage {largest}"] * bool(largest) + sorted(set(stage_bytes) & set(KEEP_RESIDENT))
    )
    why = (
        f"auto: resident needs {_gib(resident)} but {where}; sequential needs "
        f"{_gib(sequential)} ({parts} + activations)"
    )
    if sequential <= free:
        return "sequential", why
    if device.type != "cuda":
        return "sequential", why + "; nothing fits, and sequential needs the least host memory"
    return "streaming", why + "; streaming keeps only the blocks in flight on the device"
