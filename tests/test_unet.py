"""Stage B/C UNet: configs, the official key layout, and parity with diffusers' StableCascadeUNet.

Parity runs on tiny configs that keep head dim 64, with every diffusers parameter drawn away
from its (often zero) default, weights copied into our model through the real key map
(cascade_rt.weights.keymap), and fresh random inputs: batch 2, non-square and odd latent sizes,
effnet at another resolution than the stem. Tolerances are relative to the output scale
max|ref|: fp32 within 1e-5; bf16 within 2x the error of diffusers' own bf16 run.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from cascade_rt.models.unet import (
    STAGE_B,
    STAGE_B_LITE,
    STAGE_C,
    STAGE_C_LITE,
    StableCascadeUNet,
    UNetConfig,
)
from cascade_rt.models.unet_blocks import AttnBlock, ResBlock, TimestepBlock
from cascade_rt.weights import keymap

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "checkpoints"
PRESETS = {
    "stage_c": (STAGE_C, "diffusers_prior"),
    "stage_c_lite": (STAGE_C_LITE, "diffusers_prior_lite"),
    "stage_b": (STAGE_B, "diffusers_decoder"),
    "stage_b_lite": (STAGE_B_LITE, "diffusers_decoder_lite"),
}
RES, TS, ATT = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
FP32_TOL = 1e-5  # max abs error / max|ref|

PRIOR = {  # Stage C-like: two levels at one resolution, repeats on both paths
    "in_channels": 8,
    "out_channels": 8,
    "timestep_ratio_embedding_dim": 64,
    "patch_size": 1,
    "conditioning_dim": 96,
    "block_out_channels": [128, 128],
    "num_attention_heads": [2, 2],
    "down_num_layers_per_block": [1, 2],
    "up_num_layers_per_block": [2, 1],
    "down_blocks_repeat_mappers": [2, 1],
    "up_blocks_repeat_mappers": [1, 2],
    "block_types_per_layer": [[RES, TS, ATT], [RES, TS, ATT]],
    "clip_text_in_channels": 32,
    "clip_text_pooled_in_channels": 40,
    "clip_image_in_channels": 24,
    "clip_seq": 3,
    "effnet_in_channels": None,
    "pixel_mapper_in_channels": None,
    "kernel_size": 3,
    "dropout": [0.0, 0.0],
    "self_attn": True,
    "timestep_conditioning_type": ["sca", "crp"],
    "switch_level": [False],
}
# Same with bilinear level switching and cross-attention only (not in released models).
PRIOR_SWITCHED = {**PRIOR, "switch_level": [True], "self_attn": False}
DECODER = {  # Stage B-like: 4 levels, patch 2, attention at the two deepest, up repeats > 1
    "in_channels": 4,
    "out_channels": 4,
    "timestep_ratio_embedding_dim": 64,
    "patch_size": 2,
    "conditioning_dim": 80,
    "block_out_channels": [32, 48, 64, 128],
    "num_attention_heads": [0, 0, 1, 2],
    "down_num_layers_per_block": [1, 1, 2, 1],
    "up_num_layers_per_block": [1, 2, 1, 1],
    "down_blocks_repeat_mappers": [1, 1, 1, 1],
    "up_blocks_repeat_mappers": [2, 3, 2, 2],
    "block_types_per_layer": [[RES, TS], [RES, TS], [RES, TS, ATT], [RES, TS, ATT]],
    "clip_text_in_channels": None,
    "clip_text_pooled_in_channels": 40,
    "clip_image_in_channels": None,
    "clip_seq": 4,
    "effnet_in_channels": 16,
    "pixel_mapper_in_channels": 3,
    "kernel_size": 3,
    "dropout": [0.0, 0.0, 0.0, 0.0],
    "self_attn": True,
    "timestep_conditioning_type": ["sca"],
    "switch_level": None,
}
TINY = {"prior": PRIOR, "prior_switched": PRIOR_SWITCHED, "decoder": DECODER}


def _manifest(name: str) -> dict:
    path = REFERENCE / f"{name}.json"
    if not path.exists():
        pytest.skip(f"reference manifest {path} not available")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_the_diffusers_configs(name):
    preset, diffusers_name = PRESETS[name]
    config = _manifest(diffusers_name)["config"]
    assert UNetConfig.from_dict(config) == preset
    assert preset.to_dict() == config


def test_legacy_stability_names():
    stage_c_lite = {
        "_class_name": "StableCascadeUnet",
        "c_in": 16,
        "c_out": 16,
        "c_r": 64,
        "patch_size": 1,
        "c_cond": 1536,
        "c_hidden": [1536, 1536],
        "nhead": [24, 24],
        "blocks": [[4, 12], [12, 4]],
        "block_repeat": [[1, 1], [1, 1]],
        "level_config": ["CTA", "CTA"],
        "c_clip_text": 1280,
        "c_clip_text_pooled": 1280,
        "c_clip_img": 768,
        "c_clip_seq": 4,
        "kernel_size": 3,
        "dropout": [0.1, 0.1],
        "self_attn": True,
        "t_conds": ["sca", "crp"],
        "switch_level": [False],
    }
    assert UNetConfig.from_dict(stage_c_lite) == STAGE_C_LITE
    stage_b = {
        "c_in": 4,
        "c_out": 4,
        "c_r": 64,
        "patch_size": 2,
        "c_cond": 1280,
        "c_hidden": [320, 640, 1280, 1280],
        "nhead": [0, 0, 20, 20],
        "blocks": [[2, 6, 28, 6], [6, 28, 6, 2]],
        "block_repeat": [[1, 1, 1, 1], [3, 3, 2, 2]],
        "level_config": ["CT", "CT", "CTA", "CTA"],
        "c_clip": 1280,
        "c_clip_seq": 4,
        "c_effnet": 16,
        "c_pixels": 3,
        "kernel_size": 3,
        "dropout": [0, 0, 0.1, 0.1],
        "self_attn": True,
        "t_conds": ["sca"],
        "switch_level": None,
    }
    assert UNetConfig.from_dict(stage_b) == STAGE_B


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"c_typo": 1}, "unknown config key 'c_typo'"),
        ({"c_in": 16}, "'in_channels' given twice"),
        ({"level_config": ["CTF", "CTA"]}, "letters \\['F'\\]"),
        ({"up_num_layers_per_block": [1]}, "up_num_layers_per_block has 1 entries for 2 levels"),
        ({"num_attention_heads": [3, 2]}, "128 channels cannot be split into 3"),
        ({"switch_level": [False, True]}, "switch_level needs 1 entries"),
    ],
)
def test_from_dict_rejects_bad_configs(change, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig.from_dict({**PRIOR, **change})


# ------------------------------------------------------------------------- official keys
@pytest.mark.parametrize("name", PRESETS)
def test_meta_build_has_the_official_keys(name):
    preset, _ = PRESETS[name]
    official = {k: tuple(v) for k, v in _manifest(name)["keys"].items()}
    with torch.device("meta"):
        model = StableCascadeUNet(preset)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(official.keys() - ours.keys()) == []  # missing
    assert sorted(ours.keys() - official.keys()) == []  # unexpected
    assert [k for k in ours if ours[k] != official[k]] == []  # shape mismatches
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", PRESETS)
def test_config_inferred_from_official_keys(name):
    preset, _ = PRESETS[name]
    keys = _manifest(name)["keys"]
    assert UNetConfig.from_official_keys(keys) == preset
    # a safetensors header lists keys sorted, which must not change the answer
    assert UNetConfig.from_official_keys(dict(sorted(keys.items()))) == preset


@pytest.mark.parametrize("name", ["prior", "prior_switched", "decoder"])
def test_config_inferred_from_tiny_state_dict(name):
    config = UNetConfig.from_dict(TINY[name])
    with torch.device("meta"):
        model = StableCascadeUNet(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # self_attn and bilinear switching leave no trace in the weights: inferred as released
    expected = PRIOR if name == "prior_switched" else TINY[name]
    assert UNetConfig.from_official_keys(shapes) == UNetConfig.from_dict(expected)


def test_from_official_keys_rejects_unknown_stage():
    with pytest.raises(ValueError, match="found neither"):
        UNetConfig.from_official_keys({"embedding.1.weight": (8, 8, 1, 1)})


# ---------------------------------------------------------------------------------- parity
def _init_away_from_defaults(model: torch.nn.Module, seed: int) -> None:
    """N(0, 0.7^2 / fan_in) matrices, N(0, 0.2^2) biases, N(0, 0.5^2) GRN gamma/beta."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.7 / math.sqrt(p[0].numel())
            elif name.endswith(("gamma", "beta")):
                std = 0.5
            else:
                std = 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _pair(name: str):
    """(diffusers model, our model) with the same random weights, fp32, eval."""
    from diffusers import StableCascadeUNet as DiffusersUNet

    reference = DiffusersUNet(**TINY[name]).eval()
    _init_away_from_defaults(reference, seed=len(name))
    config = UNetConfig.from_dict(TINY[name])
    with torch.device("meta"):
        ours = StableCascadeUNet(config)
    ours = ours.to_empty(device="cpu").eval()
    component = "decoder" if config.is_decoder else "prior"
    views = keymap.to_diffusers(component, ours.state_dict())
    source = reference.state_dict()
    assert views.keys() == source.keys()
    with torch.no_grad():
        for key, view in views.items():
            view.copy_(source[key])
    return reference, ours


@pytest.fixture(scope="module")
def models():
    return {name: _pair(name) for name in TINY}


def _inputs(name: str, seed: int, batch: int = 2, pixels: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    r = torch.rand(batch, generator=gen)
    if name.startswith("prior"):
        return {
            "sample": randn(batch, 8, 6, 9),
            "timestep_ratio": r,
            "clip_text_pooled": randn(batch, 1, 40),
            "clip_text": randn(batch, 7, 32),
            "clip_img": randn(batch, 1, 24),
        }
    # latent 26x38 -> levels 13x19, 6x9, 3x4, 1x2: every up step needs the skip resize
    extra = {"pixels": randn(batch, 3, 8, 8)} if pixels else {}
    return {
        "sample": randn(batch, 4, 26, 38),
        "timestep_ratio": r,
        "clip_text_pooled": randn(batch, 1, 40),
        "effnet": randn(batch, 16, 5, 7),
        **extra,
    }


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize(
    ("name", "pixels"),
    [("prior", False), ("prior_switched", False), ("decoder", False), ("decoder", True)],
)
def test_fp32_parity(models, name, pixels):
    reference, ours = models[name]
    inputs = _inputs(name, seed=10, pixels=pixels)
    with torch.no_grad():
        ref = reference(**inputs).sample
        out = ours(**inputs)
    assert out.shape == ref.shape
    err = _rel_err(out, ref)
    print(f"{name} pixels={pixels}: max|ref|={ref.abs().max():.3g}, rel max abs err={err:.2e}")
    assert err <= FP32_TOL


def test_fp32_parity_t_conds_and_2d_clip_img(models):
    """Non-zero sca/crp (diffusers' `cond or zeros` only accepts one element: batch 1)."""
    reference, ours = models["prior"]
    inputs = _inputs("prior", seed=11, batch=1)
    inputs["clip_img"] = inputs["clip_img"][:, 0]  # [B, C] is accepted and unsqueezed
    t_conds = {"sca": torch.tensor([0.3]), "crp": torch.tensor([0.7])}
    with torch.no_grad():
        ref = reference(**inputs, **t_conds).sample
        out = ours(**inputs, **t_conds)
        without = ours(**inputs)
    assert _rel_err(out, ref) <= FP32_TOL
    assert _rel_err(without, ref) > 100 * FP32_TOL  # the t_conds do reach the output


@pytest.mark.parametrize("name", ["prior", "decoder"])
def test_bf16_parity(models, name):
    reference, ours = models[name]
    inputs = _inputs(name, seed=12)
    with torch.no_grad():
        ref = reference(**inputs).sample
        ref16_model, ours16 = copy.deepcopy(reference).bfloat16(), copy.deepcopy(ours).bfloat16()
        # diffusers quantises r to bf16 before its sinusoids (§6); give it the fp32 embedding
        embed = ref16_model.get_timestep_ratio_embedding
        ref16_model.get_timestep_ratio_embedding = lambda r: embed(r.float()).bfloat16()
        same = {k: v if k == "timestep_ratio" else v.bfloat16() for k, v in inputs.items()}
        ref16 = ref16_model(**same).sample
        out16 = ours16(**same)
    assert out16.dtype == torch.bfloat16
    err, ref_err = _rel_err(out16, ref), _rel_err(ref16, ref)
    print(f"{name} bf16: ours {err:.2e}, diffusers bf16 {ref_err:.2e} (relative to fp32 output)")
    assert err <= 2 * ref_err


# ------------------------------------------------------------------------ runtime contract
def test_prepared_conditions_match_plain_forward(models):
    _, ours = models["decoder"]
    inputs = _inputs("decoder", seed=13, pixels=True)
    sample, r = inputs.pop("sample"), inputs.pop("timestep_ratio")
    with torch.no_grad():
        conditions = ours.prepare(tuple(sample.shape[-2:]), **inputs)
        for step_r in (r, 1 - r):
            direct = ours(sample, step_r, **inputs)
            assert torch.equal(ours(sample, step_r, conditions=conditions), direct)


@pytest.mark.parametrize("name", ["prior", "decoder"])
def test_activations_stay_channels_last(models, name):
    _, ours = models[name]
    seen = []

    def check(module, args, output):
        seen.append(output.is_contiguous(memory_format=torch.channels_last))

    handles = [
        m.register_forward_hook(check)
        for m in ours.modules()
        if isinstance(m, ResBlock | TimestepBlock | AttnBlock)
    ]
    try:
        with torch.no_grad():
            ours(**_inputs(name, seed=14))
    finally:
        for h in handles:
            h.remove()
    assert seen and all(seen)


@pytest.mark.parametrize(
    ("name", "change", "error", "message"),
    [
        (
            "prior",
            {"clip_text_pooled": (2, 40)},
            ValueError,
            r"clip_text_pooled must be \[B, N, C\]",
        ),
        ("prior", {"clip_text_pooled": (2, 1, 41)}, ValueError, "with 40 channels"),
        ("prior", {"clip_text": (2, 7, 33)}, ValueError, "clip_text must be .* 32 channels"),
        ("prior", {"clip_text": (3, 7, 32)}, ValueError, "clip_text has batch 3, expected 2"),
        ("prior", {"clip_img": None}, ValueError, "clip_text and clip_img together"),
        ("prior", {"effnet": (2, 16, 4, 4)}, ValueError, "takes no effnet"),
        ("prior", {"sample": (2, 9, 6, 9)}, ValueError, "sample must be .* 8 channels"),
        ("prior", {"timestep_ratio": (3,)}, ValueError, "timestep_ratio has 3 values for batch 2"),
        ("decoder", {"sample": (2, 4, 25, 38)}, ValueError, "not a multiple of patch_size 2"),
        ("decoder", {"effnet": (2, 15, 5, 7)}, ValueError, "effnet must be .* 16 channels"),
        ("decoder", {"crp": (2,)}, ValueError, "no crp conditioning"),
        ("decoder", {"clip_text_pooled": None}, ValueError, "clip_text_pooled .* is required"),
    ],
)
def test_bad_inputs_fail_before_any_work(models, name, change, error, message):
    _, ours = models[name]
    inputs = _inputs(name, seed=15)
    for key, shape in change.items():
        inputs[key] = None if shape is None else torch.randn(shape)
    calls = []
    handles = [
        m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in list(ours.modules())[1:]
    ]
    try:
        with pytest.raises(error, match=message), torch.no_grad():
            ours(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert calls == []
