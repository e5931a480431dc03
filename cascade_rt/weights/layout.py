"""Finding a component's files in the checkpoint layouts people actually have on disk.

Recognised (file names as diffusers 0.42.1 / transformers 5.23 write them):

* `StableCascadeCombinedPipeline.save_pretrained`: model_index.json, prior_prior/, decoder/,
  vqgan/, text_encoder/, tokenizer/, scheduler/ (and prior_text_encoder/, prior_tokenizer/,
  prior_scheduler/, used when the unprefixed folder is absent).
* hub `stable-cascade-prior`: prior/, prior_lite/, text_encoder/, tokenizer/, scheduler/.
* hub `stable-cascade`: decoder/, decoder_lite/, vqgan/, text_encoder/, tokenizer/, scheduler/ and,
  beside them, the official files stage_a.safetensors, stage_{b,c}[_lite][_bf16].safetensors.
* a component folder itself, a single .safetensors file, or a sharded checkpoint's index json.

Inside a diffusers model folder the weights are `<base>[.<variant>].safetensors` or shards
`<base>[.<variant>]-00001-of-0000N.safetensors` listed by
`<base>.safetensors.index[.<variant>].json` (`<base>.safetensors.<variant>.index.json` in older
saves); base is `diffusion_pytorch_model`, or `model` for the text encoder. A requested variant
falls back to the plain files (the loader casts to the run dtype anyway); with no variant
requested, a folder holding exactly one variant uses it.

The stage is detected from the keys, so a file of another stage is refused by name before loading.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .safetensors_io import CheckpointError, TensorInfo, read_header

COMPONENTS = ("prior", "decoder", "vqgan", "text_encoder", "tokenizer", "scheduler")
_STAGE = {
    "prior": "Stage C",
    "decoder": "Stage B",
    "vqgan": "Stage A",
    "text_encoder": "CLIP text encoder",
}
_OFFICIAL_STEM = {"prior": "stage_c", "decoder": "stage_b", "vqgan": "stage_a"}
_CLASS_NAMES = {
    "prior": {"StableCascadeUNet"},
    "decoder": {"StableCascadeUNet"},
    "vqgan": {"PaellaVQModel"},
    "text_encoder": {"CLIPTextModelWithProjection", "CLIPTextModel"},
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
_SHARD = re.compile(r".*-\d{5}-of-\d{5}(\.[A-Za-z0-9_]+)?\.safetensors$")


@dataclass(frozen=True)
class Source:
    """Where one component lives: its layout, files, parsed config and (for weights) tensors."""

    component: str
    layout: str  # "diffusers" | "official"
    folder: Path
    files: tuple[Path, ...]
    config: dict[str, Any] | None
    tensors: Mapping[str, TensorInfo]  # every tensor of every file; empty for tokenizer/scheduler
    variant: str | None = None  # the variant actually found, e.g. "bf16"


def detect_component(keys: Mapping[str, object] | set[str]) -> str | None:
    """Which model a set of checkpoint keys belongs to (official or diffusers names)."""
    if "clip_txt_mapper.weight" in keys:
        return "prior"
    if "effnet_mapper.0.weight" in keys:
        return "decoder"
    if "vquantizer.codebook.weight" in keys or "vquantizer.embedding.weight" in keys:
        return "vqgan"
    if any(k.startswith("text_model.") for k in keys):
        return "text_encoder"
    return None


def _detect_layout(component: str, keys: Mapping[str, object], default: str) -> str:
    if component == "text_encoder":
        return "diffusers"
    if component == "vqgan":
        return "official" if "vquantizer.codebook.weight" in keys else "diffusers"
    if any(k.endswith(".attention.to_q.weight") for k in keys):
        return "diffusers"
    if any(k.endswith(".attention.attn.in_proj_weight") for k in keys):
        return "official"
    return default


def _listing(folder: Path) -> str:
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    except OSError:
        return "(unreadable)"
    return ", ".join(names) or "(empty)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def weights_base(component: str) -> str:
    """File name stem of a diffusers (or transformers) model folder's weights."""
    return "model" if component == "text_encoder" else "diffusion_pytorch_model"


def index_name(base: str, variant: str | None) -> str:
    """Sharded-checkpoint index name, as diffusers' and transformers' `_add_variant` make it."""
    return f"{base}.safetensors.index{f'.{variant}' if variant else ''}.json"


def official_name(component: str, *, lite: bool = False, variant: str | None = None) -> str:
    """Official Stability file name; Stage A has no lite file."""
    stem = _OFFICIAL_STEM[component] + ("_lite" if lite and component != "vqgan" else "")
    return f"{stem}_{variant}.safetensors" if variant else f"{stem}.safetensors"


def _index_names(base: str, variant: str | None) -> tuple[str, ...]:
    if variant is None:
        return (index_name(base, None),)
    # diffusers still reads the pre-0.22 name `<base>.safetensors.<variant>.index.json`.
    return (index_name(base, variant), f"{base}.safetensors.{variant}.index.json")


def _find_diffusers_weights(
    folder: Path, component: str, variant: str | None
) -> tuple[Path, str | None] | None:
    """(single file or index json, variant) in a diffusers model folder, or None."""
    base = weights_base(component)
    for v in (variant, None) if variant else (None,):
        single = folder / (f"{base}.{v}.safetensors" if v else f"{base}.safetensors")
        if single.is_file():
            return single, v
        for name in _index_names(base, v):
            if (folder / name).is_file():
                return folder / name, v
    if variant is None:
        single_re = rf"^{base}\.(\w+)\.safetensors$"
        pattern = re.compile(rf"{single_re}|^{base}\.safetensors\.index\.(\w+)\.json$")
        found = {m[1] or m[2] for p in _names(folder) if (m := pattern.match(p))}
        if len(found) > 1:
            raise CheckpointError(
                f"{folder} holds several variants {sorted(found)} and none was requested; "
                f"pass variant=one of them"
            )
        if found:
            return _find_diffusers_weights(folder, component, found.pop())
    return None


def _names(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir()]
    except OSError:
        return []


def _shard_files(index: Path) -> tuple[list[Path], dict[str, str]]:
    data = _read_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    names = sorted(set(weight_map.values()))
    for name in names:
        if not isinstance(name, str) or os.path.basename(name) != name:
            raise CheckpointError(f"{index}: shard name {name!r} must be a plain file name")
        if not (index.parent / name).is_file():
            raise CheckpointError(f"{index}: lists shard {name} which is not in {index.parent}")
    return [index.parent / n for n in names], weight_map


def _read_tensors(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_header(path).tensors.items():
            if name in tensors:
                raise CheckpointError(f"key {name!r} is in both {tensors[name].path} and {path}")
            if weight_map is not None and weight_map.get(name) != path.name:
                raise CheckpointError(
                    f"{path}: key {name!r} is not listed for this shard in the index "
                    f"(index says {weight_map.get(name)!r})"
                )
            tensors[name] = info
    if weight_map is not None and (absent := sorted(set(weight_map) - tensors.keys())):
        raise CheckpointError(
            f"index of {files[0].parent} lists {len(absent)} keys absent from its shards, "
            f"e.g. {absent[:10]}"
        )
    return tensors


def _weights_source(
    component: str, entry: Path, variant: str | None, default_layout: str
) -> Source:
    """Source for a weights file or index json `entry`; checks config and stage."""
    folder = entry.parent
    if entry.name.endswith(".json"):
        files, weight_map = _shard_files(entry)
    else:
        files, weight_map = [entry], None
    tensors = _read_tensors(files, weight_map)

    config = None
    if default_layout == "diffusers" and (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
        names = {config.get("_class_name"), *config.get("architectures", ())} - {None}
        if names and not names & _CLASS_NAMES[component]:
            raise CheckpointError(
                f"{folder / 'config.json'} describes {sorted(names)}, expected "
                f"{sorted(_CLASS_NAMES[component])} for component {component!r}"
            )

    found = detect_component(tensors)
    where = entry if len(files) == 1 else folder
    if found != component:
        what = f"{_STAGE[found]} weights" if found else "no recognisable weights"
        raise CheckpointError(f"{where} holds {what}, expected {_STAGE[component]}")
    layout = _detect_layout(component, tensors, default_layout)
    return Source(component, layout, folder, tuple(files), config, tensors, variant)


def _official_names(
    component: str, variant: str | None, lite: bool
) -> list[tuple[str, str | None]]:
    """(file name, its variant) in order of preference; Stage A was released in fp32 only."""
    order = [variant, None] if variant else [None] if component == "vqgan" else [None, "bf16"]
    return [(official_name(component, lite=lite, variant=v), v) for v in order]


def _subfolders(component: str, lite: bool, combined: bool) -> tuple[str, ...]:
    if combined:
        return {"prior": ("prior_prior",), "decoder": ("decoder",), "vqgan": ("vqgan",)}.get(
            component, (component, f"prior_{component}")
        )
    if component in ("prior", "decoder"):
        return (f"{component}_lite",) if lite else (component,)
    return (component,)


def _is_combined(root: Path) -> bool:
    index = root / "model_index.json"
    if index.is_file() and _read_json(index).get("_class_name") == "StableCascadeCombinedPipeline":
        return True
    return (root / "prior_prior").is_dir()


def _auxiliary_source(component: str, folder: Path) -> Source | None:
    """Tokenizer or scheduler folder, or None when `folder` is not one."""
    if component == "scheduler":
        path = folder / "scheduler_config.json"
        if not path.is_file():
            return None
        return Source(component, "diffusers", folder, (path,), _read_json(path), {})
    files = tuple(folder / n for n in _TOKENIZER_FILES if (folder / n).is_file())
    names = {p.name for p in files}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        return None
    config_path = folder / "tokenizer_config.json"
    config = _read_json(config_path) if config_path.is_file() else None
    return Source(component, "diffusers", folder, files, config, {})


def locate(
    path: str | os.PathLike[str],
    component: str,
    *,
    variant: str | None = None,
    lite: bool = False,
) -> Source:
    """Finds `component` under `path` (a repo/pipeline folder, component folder or file).

    `lite` picks prior_lite/, decoder_lite/ or stage_{b,c}_lite files where a layout holds both
    sizes; a combined pipeline save holds one prior and one decoder, used whatever `lite` says.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
    path = Path(path)
    weights = component in _STAGE
    if path.is_file():
        if not weights:
            raise CheckpointError(f"{path} is a file; a {component} needs its folder")
        if _SHARD.match(path.name):
            raise CheckpointError(f"{path} is one shard; pass its folder or index json")
        diffusers = path.name.endswith(".json") or path.name.startswith(weights_base(component))
        return _weights_source(component, path, None, "diffusers" if diffusers else "official")
    if not path.is_dir():
        raise CheckpointError(f"{path} does not exist")

    # The path may be the component folder itself.
    if weights:
        if hit := _find_diffusers_weights(path, component, variant):
            return _weights_source(component, hit[0], hit[1], "diffusers")
    elif src := _auxiliary_source(component, path):
        return src

    looked: list[str] = []
    for sub in _subfolders(component, lite, _is_combined(path)):
        folder = path / sub
        looked.append(f"{sub}/")
        if not folder.is_dir():
            continue
        if weights:
            if hit := _find_diffusers_weights(folder, component, variant):
                return _weights_source(component, hit[0], hit[1], "diffusers")
            raise CheckpointError(
                f"{folder} has no {weights_base(component)}[.<variant>].safetensors "
                f"nor index json; found: {_listing(folder)}"
            )
        if src := _auxiliary_source(component, folder):
            return src
        raise CheckpointError(f"{folder} is not a {component} folder; found: {_listing(folder)}")
    if component in _OFFICIAL_STEM:
        for name, v in _official_names(component, variant, lite):
            looked.append(name)
            if (path / name).is_file():
                return _weights_source(component, path / name, v, "official")
    raise CheckpointError(
        f"no {component} under {path}: looked for {', '.join(looked)}; found: {_listing(path)}"
    )
