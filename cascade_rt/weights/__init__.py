"""Checkpoint reading, key maps, layouts, one-arena loading and writing (design.md "Weights").

Typical use:

    source = locate("path/to/stable-cascade-prior", "prior", variant="bf16")
    with torch.device("meta"):
        unet = StableCascadeUNet(UNetConfig.from_dict(source.config))
    load_module(unet, source, device="cuda", dtype=torch.bfloat16)
"""

from .arena import Arena
from .keymap import Piece, canonical_shapes, diffusers_shapes, plan, to_diffusers
from .layout import COMPONENTS, Source, detect_component, locate
from .loader import load_module
from .safetensors_io import CheckpointError, SafetensorsHeader, TensorInfo, read_header
from .writer import write_component, write_json

__all__ = [
    "COMPONENTS",
    "Arena",
    "CheckpointError",
    "Piece",
    "SafetensorsHeader",
    "Source",
    "TensorInfo",
    "canonical_shapes",
    "detect_component",
    "diffusers_shapes",
    "load_module",
    "locate",
    "plan",
    "read_header",
    "to_diffusers",
    "write_component",
    "write_json",
]
