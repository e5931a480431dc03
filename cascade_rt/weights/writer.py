"""Writing a canonical state dict as a checkpoint in either layout, named as the originals are.

diffusers layout (what `ModelMixin.save_pretrained` / transformers' `save_pretrained` write):
    config.json (json.dumps(indent=2, sort_keys=True) + newline)
    <base>[.<variant>].safetensors, or when sharded
    <base>[.<variant>]-00001-of-0000N.safetensors + <base>.safetensors.index[.<variant>].json
    with base `diffusion_pytorch_model`, `model` for the text encoder.
official layout: one flat file stage_{c,b}[_lite][_<variant>].safetensors or stage_a.safetensors.

Every file is written atomically; stale weight files of the same variant left by an earlier save
with another sharding are removed, as diffusers does, so `locate` never sees two versions.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .keymap import WEIGHT_COMPONENTS, to_diffusers
from .layout import index_name, official_name, weights_base
from .safetensors_io import write_safetensors

# Written into config.json when the caller's config lacks them, so the folder says what it holds.
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "prior": {"_class_name": "StableCascadeUNet"},
    "decoder": {"_class_name": "StableCascadeUNet"},
    "vqgan": {"_class_name": "PaellaVQModel"},
    "text_encoder": {"architectures": ["CLIPTextModelWithProjection"]},
}


def write_json(obj: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Writes JSON the way diffusers' save_config does (indent 2, sorted keys), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _nbytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    return t.numel() * (dtype if dtype is not None and t.is_floating_point() else t.dtype).itemsize


def _shards(
    tensors: Mapping[str, torch.Tensor], max_bytes: int, dtype: torch.dtype | None
) -> list[dict[str, torch.Tensor]]:
    """Greedy split in state-dict order (huggingface_hub's rule: a tensor larger than the limit
    gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    for name, t in tensors.items():
        nbytes = _nbytes(t, dtype)
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _remove_stale(folder: Path, base: str, variant: str | None, keep: set[str]) -> None:
    stem = re.escape(f"{base}.{variant}" if variant else base)
    shard = re.compile(rf"^{stem}(-\d{{5}}-of-\d{{5}})?\.safetensors$")
    for p in folder.iterdir():
        stale = shard.match(p.name) or p.name == index_name(base, variant)
        if p.name not in keep and stale and p.is_file():
            p.unlink()


def write_component(
    state_dict: Mapping[str, torch.Tensor],
    component: str,
    folder: str | os.PathLike[str],
    *,
    layout: str = "diffusers",
    config: Mapping[str, Any] | None = None,
    variant: str | None = None,
    lite: bool = False,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    filename: str | None = None,
) -> list[Path]:
    """Writes canonical tensors of `component` into `folder`; returns the files written.

    `dtype` casts float tensors on the way out (e.g. bfloat16 with variant="bf16"); `lite` only
    names official Stage B/C files; `filename` replaces the official file name (`locate` finds
    official files under their released names only); `max_shard_bytes` shards a diffusers
    checkpoint.
    """
    if component not in WEIGHT_COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {WEIGHT_COMPONENTS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    if layout == "official":
        if component == "text_encoder":
            raise ValueError("the text encoder has no official single-file layout; use diffusers")
        if config is not None or max_shard_bytes is not None:
            raise ValueError("official single files carry no config.json and are never sharded")
        path = folder / (filename or official_name(component, lite=lite, variant=variant))
        write_safetensors(state_dict, path, dtype=dtype)
        return [path]
    if layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}; expected 'diffusers' or 'official'")
    if filename is not None:
        raise ValueError("filename applies to the official layout; diffusers names are fixed")

    written: list[Path] = []
    if config is not None:
        write_json({**_CONFIG_DEFAULTS[component], **config}, folder / "config.json")
        written.append(folder / "config.json")
    base = weights_base(component)
    stem = f"{base}.{variant}" if variant else base
    tensors = to_diffusers(component, state_dict)
    shards = _shards(tensors, max_shard_bytes, dtype) if max_shard_bytes else [tensors]

    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        n = len(shards)
        names = [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(shard, folder / name, dtype=dtype)
        written.append(folder / name)
    if len(shards) > 1:
        total = sum(_nbytes(t, dtype) for t in tensors.values())
        weight_map = {k: name for name, shard in zip(names, shards, strict=True) for k in shard}
        index = folder / index_name(base, variant)
        write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, index)
        written.append(index)
    _remove_stale(folder, base, variant, {p.name for p in written})
    return written
