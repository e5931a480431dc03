"""The diffusers <-> canonical key map, proved on the manifests of the real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cascade_rt.weights import canonical_shapes, diffusers_shapes, plan, to_diffusers
from cascade_rt.weights.keymap import Piece, canonical_key

MANIFESTS = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "checkpoints"
PAIRS = [
    ("prior", "diffusers_prior", "stage_c"),
    ("prior", "diffusers_prior_lite", "stage_c_lite"),
    ("decoder", "diffusers_decoder", "stage_b"),
    ("decoder", "diffusers_decoder_lite", "stage_b_lite"),
    ("vqgan", "diffusers_vqgan", "stage_a"),
]


def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    if not MANIFESTS.is_dir():
        pytest.skip(f"checkpoint manifests not found at {MANIFESTS.resolve()}")
    keys = json.loads((MANIFESTS / f"{name}.json").read_text())["keys"]
    return {k: tuple(v) for k, v in keys.items()}


def _diff(got: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]]) -> str:
    missing = sorted(want.keys() - got.keys())
    unexpected = sorted(got.keys() - want.keys())
    mismatched = sorted(k for k in want.keys() & got.keys() if got[k] != want[k])
    return f"missing {missing[:5]} unexpected {unexpected[:5]} mismatched {mismatched[:5]}"


@pytest.mark.parametrize(("component", "diffusers", "official"), PAIRS)
def test_diffusers_manifest_maps_exactly_onto_official(
    component: str, diffusers: str, official: str
) -> None:
    got = canonical_shapes(component, _manifest(diffusers))
    want = _manifest(official)
    assert got == want, _diff(got, want)


@pytest.mark.parametrize(("component", "diffusers", "official"), PAIRS)
def test_official_manifest_maps_exactly_onto_diffusers(
    component: str, diffusers: str, official: str
) -> None:
    got = diffusers_shapes(component, _manifest(official))
    want = _manifest(diffusers)
    assert got == want, _diff(got, want)


def test_fused_attention_pieces() -> None:
    shapes = {
        "down_blocks.0.2.attention.attn.in_proj_weight": (6, 2),
        "down_blocks.0.2.attention.attn.in_proj_bias": (6,),
        "down_blocks.0.2.attention.attn.out_proj.weight": (2, 2),
        "clip_mapper.weight": (8, 4),
    }
    fused = "down_blocks.0.2.attention.attn.in_proj_weight"
    pieces = plan("decoder", "diffusers", shapes)
    assert pieces[:3] == [
        Piece("down_blocks.0.2.attention.to_q.weight", fused, (0, 2)),
        Piece("down_blocks.0.2.attention.to_k.weight", fused, (2, 4)),
        Piece("down_blocks.0.2.attention.to_v.weight", fused, (4, 6)),
    ]
    assert pieces[3].shape(shapes["down_blocks.0.2.attention.attn.in_proj_bias"]) == (2,)
    assert [p.file_key for p in pieces[6:]] == [
        "down_blocks.0.2.attention.to_out.0.weight",
        "clip_txt_pooled_mapper.weight",
    ]
    # Stage C keeps clip_txt_pooled_mapper under its own name and has no clip_mapper rename.
    assert canonical_key("prior", "clip_txt_pooled_mapper.weight") == (
        "clip_txt_pooled_mapper.weight",
        None,
    )
    assert plan("decoder", "official", shapes) == [Piece(k, k) for k in shapes]
    assert canonical_key("vqgan", "vquantizer.embedding.weight") == (
        "vquantizer.codebook.weight",
        None,
    )


def test_text_encoder_is_identity() -> None:
    shapes = {"text_model.encoder.layers.0.self_attn.q_proj.weight": (4, 4)}
    assert plan("text_encoder", "diffusers", shapes) == [
        Piece(next(iter(shapes)), next(iter(shapes)))
    ]


def test_fused_tensor_needs_three_equal_parts() -> None:
    with pytest.raises(ValueError, match=r"in_proj_weight: fused q/k/v tensor needs 3c rows"):
        diffusers_shapes("prior", {"a.attention.attn.in_proj_weight": (4, 2)})
    with pytest.raises(ValueError, match=r"in_proj_weight: q/k/v parts missing"):
        canonical_shapes(
            "prior", {"a.attention.to_q.weight": (2, 2), "a.attention.to_k.weight": (2, 2)}
        )


def test_to_diffusers_slices_are_views_of_the_fused_tensor() -> None:
    w = torch.arange(12.0).view(6, 2)
    out = to_diffusers("prior", {"x.attention.attn.in_proj_weight": w})
    assert torch.equal(torch.cat([out[f"x.attention.to_{n}.weight"] for n in "qkv"]), w)
    assert out["x.attention.to_k.weight"].data_ptr() == w[2:].data_ptr()


def test_unknown_component_and_layout() -> None:
    with pytest.raises(ValueError, match="unknown component 'stage_x'"):
        plan("stage_x", "official", {})
    with pytest.raises(ValueError, match="unknown layout 'comfy'"):
        plan("prior", "comfy", {})
