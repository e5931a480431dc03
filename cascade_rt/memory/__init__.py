"""Where each stage's weights live: resident, swapped through one region, or streamed by block.

    planner = MemoryPlanner("auto", device, {name: StageWeights(...), ...}, n_slots=2)
    with planner.use("prior") as prior:
        ...
    planner.report()

modes.py: the modes, `choose_mode` ("auto") and memory readings; weights.py: `StageWeights` and
buffer layout; copier.py: the copy stream; planner.py: `MemoryPlanner` (resident, sequential);
streaming.py: the streamed-block slots and their schedule.
"""

from cascade_rt.memory.modes import (
    ACTIVATION_ALLOWANCE,
    KEEP_RESIDENT,
    MODES,
    REQUESTS,
    STAGE_NAMES,
    choose_mode,
)
from cascade_rt.memory.planner import MemoryPlanner
from cascade_rt.memory.weights import StageWeights

__all__ = [
    "ACTIVATION_ALLOWANCE",
    "KEEP_RESIDENT",
    "MODES",
    "REQUESTS",
    "STAGE_NAMES",
    "MemoryPlanner",
    "StageWeights",
    "choose_mode",
]
