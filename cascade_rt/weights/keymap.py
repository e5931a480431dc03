"""Checkpoint key maps: diffusers keys <-> canonical keys (design.md "Weights", ARCHITECTURE §9.3).

Canonical keys are the official Stability keys for Stage C ("prior"), Stage B ("decoder") and
Stage A ("vqgan"), and the Hugging Face keys for the CLIP text encoder ("text_encoder"). The
diffusers layout differs in three ways only:

    X.attention.to_q/to_k/to_v.{weight,bias} = rows [0:c], [c:2c], [2c:3c] of
        X.attention.attn.in_proj_{weight,bias}                           (prior, decoder)
    X.attention.to_out.0.{weight,bias} = X.attention.attn.out_proj.*     (prior, decoder)
    clip_txt_pooled_mapper.*           = clip_mapper.*                   (decoder only)
    vquantizer.embedding.weight        = vquantizer.codebook.weight      (vqgan)

Everything else is the same name and shape. A load is planned as a list of `Piece`s: which file
key fills which rows of which canonical tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

WEIGHT_COMPONENTS = ("prior", "decoder", "vqgan", "text_encoder")
LAYOUTS = ("diffusers", "official")
_QKV = ("q", "k", "v")

_FUSED = re.compile(r"^(.*\.attention)\.attn\.in_proj_(weight|bias)$")
_OUT = re.compile(r"^(.*\.attention)\.attn\.out_proj\.(weight|bias)$")
_SPLIT = re.compile(r"^(.*\.attention)\.to_([qkv])\.(weight|bias)$")
_TO_OUT = re.compile(r"^(.*\.attention)\.to_out\.0\.(weight|bias)$")
# File keys that carry no weights and are skipped: transformers < 4.31 saved CLIP's position_ids
# (arange(77)) as a persistent buffer; transformers itself ignores it on load.
_IGNORED: dict[str, frozenset[str]] = {
    "text_encoder": frozenset({"text_model.embeddings.position_ids"}),
}
_PREFIX_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    # (canonical prefix, diffusers prefix)
    "decoder": (("clip_mapper.", "clip_txt_pooled_mapper."),),
    "vqgan": (("vquantizer.codebook.", "vquantizer.embedding."),),
}


@dataclass(frozen=True)
class Piece:
    """File key `file_key` holds rows [rows[0], rows[1]) of `canonical_key` (all of it if None)."""

    file_key: str
    canonical_key: str
    rows: tuple[int, int] | None = None

    def shape(self, canonical_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape the file tensor must have, given the canonical tensor's shape."""
        if self.rows is None:
            return tuple(canonical_shape)
        return (self.rows[1] - self.rows[0], *canonical_shape[1:])


def _check_component(component: str) -> None:
    if component not in WEIGHT_COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {WEIGHT_COMPONENTS}")


def _fuses(component: str) -> bool:
    return component in ("prior", "decoder")


def _rename(component: str, key: str, *, to_diffusers: bool) -> str:
    for canonical, diffusers in _PREFIX_RENAMES.get(component, ()):
        src, dst = (canonical, diffusers) if to_diffusers else (diffusers, canonical)
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def ignored(component: str, file_key: str) -> bool:
    """Whether a checkpoint key is known to hold nothing the model needs."""
    return file_key in _IGNORED.get(component, ())


def diffusers_pieces(component: str, canonical_key: str, shape: Sequence[int]) -> tuple[Piece, ...]:
    """The diffusers key(s) holding canonical tensor `canonical_key` of `shape`."""
    _check_component(component)
    if _fuses(component):
        if m := _FUSED.match(canonical_key):
            if not shape or shape[0] % 3:
                raise ValueError(
                    f"{canonical_key}: fused q/k/v tensor needs 3c rows, got shape {list(shape)}"
                )
            c = shape[0] // 3
            return tuple(
                Piece(f"{m[1]}.to_{qkv}.{m[2]}", canonical_key, (i * c, (i + 1) * c))
                for i, qkv in enumerate(_QKV)
            )
        if m := _OUT.match(canonical_key):
            return (Piece(f"{m[1]}.to_out.0.{m[2]}", canonical_key),)
    return (Piece(_rename(component, canonical_key, to_diffusers=True), canonical_key),)


def canonical_key(component: str, diffusers_key: str) -> tuple[str, int | None]:
    """(canonical key, q/k/v part 0/1/2 or None) for one diffusers key."""
    _check_component(component)
    if _fuses(component):
        if m := _SPLIT.match(diffusers_key):
            return f"{m[1]}.attn.in_proj_{m[3]}", _QKV.index(m[2])
        if m := _TO_OUT.match(diffusers_key):
            return f"{m[1]}.attn.out_proj.{m[2]}", None
    return _rename(component, diffusers_key, to_diffusers=False), None


def plan(component: str, layout: str, canonical_shapes: Mapping[str, Sequence[int]]) -> list[Piece]:
    """Every piece needed to fill the canonical tensors from a checkpoint in `layout`."""
    _check_component(component)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "official" or component == "text_encoder":
        return [Piece(k, k) for k in canonical_shapes]
    return [p for k, s in canonical_shapes.items() for p in diffusers_pieces(component, k, s)]


def diffusers_shapes(
    component: str, canonical_shapes: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes a diffusers checkpoint of these canonical tensors has."""
    return {
        p.file_key: p.shape(canonical_shapes[p.canonical_key])
        for p in plan(component, "diffusers", canonical_shapes)
    }


def canonical_shapes(
    component: str, diffusers_shapes: Mapping[str, Sequence[int]]
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the canonical tensors a diffusers checkpoint holds.

    Raises ValueError when the q, k and v parts of one fused tensor are incomplete or disagree.
    """
    out: dict[str, tuple[int, ...]] = {}
    parts: dict[str, dict[int, tuple[int, ...]]] = {}
    for key, shape in diffusers_shapes.items():
        canon, part = canonical_key(component, key)
        if part is None:
            out[canon] = tuple(shape)
        else:
            parts.setdefault(canon, {})[part] = tuple(shape)
    for canon, got in parts.items():
        shapes = {got.get(i) for i in range(3)}
        if len(shapes) != 1 or None in shapes:
            raise ValueError(f"{canon}: q/k/v parts missing or of different shapes: {got}")
        (shape,) = shapes
        out[canon] = (3 * shape[0], *shape[1:])
    return out


def to_diffusers(component: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A canonical state dict in diffusers keys; q/k/v are row views of the fused tensors."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        for p in diffusers_pieces(component, key, t.shape):
            out[p.file_key] = t if p.rows is None else t[p.rows[0] : p.rows[1]]
    return out
