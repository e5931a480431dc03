"""Checkpoint reading, key maps, layouts, one-arena loading and writing (design.md "Weights").

Typical use:

    source = locate("path/to/stable-cascade-prior", "prior", variant="bf16")
    with torch.device("meta"):
        unet = StableCascadeUNet(UNetConfig.from_dict(source.config))
    load_module(unet, source, device="cuda", dtype=torch.bfloat16)

or in two steps, filling memory the caller owns (a memory planner's fixed buffer):

    load = plan_load(unet, source, torch.bfloat16)   # every check, nothing allocated
    arena = Arena(load.specs, "cuda")                 # load.nbytes bytes
    load.fill(arena.views)
"""

from .arena import Arena, arena_layout
from .keymap import Piece, canonical_shapes, diffusers_shapes, plan, to_diffusers
from .layout import COMPONENTS, Source, detect_component, locate
from .loader import LoadPlan, load_module, plan_load
from .safetensors_io import CheckpointError, SafetensorsHeader, TensorInfo, read_header
from .writer import write_component, write_json

__all__ = [
    "COMPONENTS",
    "Arena",
    "CheckpointError",
    "LoadPlan",
    "Piece",
    "SafetensorsHeader",
    "Source",
    "TensorInfo",
    "arena_layout",
    "canonical_shapes",
    "detect_component",
    "diffusers_shapes",
    "load_module",
    "locate",
    "plan",
    "plan_load",
    "read_header",
    "to_diffusers",
    "write_component",
    "write_json",
]
