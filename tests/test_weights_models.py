"""The real modules load bit-identically from every layout, and our files interoperate with the
files diffusers and transformers write and read (the libraries are used in tests only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from cascade_rt.models.stage_a import StageA, StageAConfig
from cascade_rt.models.text_encoder import CLIPTextConfig, CLIPTextEncoder
from cascade_rt.models.unet import StableCascadeUNet
from cascade_rt.models.unet_config import UNetConfig
from cascade_rt.weights import load_module, locate, write_component
from cascade_rt.weights.keymap import to_diffusers

R, T, A = "SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"
COMMON = {"in_channels": 4, "out_channels": 4, "conditioning_dim": 16}
COMMON |= {"timestep_ratio_embedding_dim": 8, "clip_text_pooled_in_channels": 8}
PRIOR = UNetConfig(
    **COMMON,
    block_out_channels=(16, 16),
    num_attention_heads=(1, 1),
    down_num_layers_per_block=(1, 1),
    up_num_layers_per_block=(1, 1),
    clip_text_in_channels=8,
    clip_image_in_channels=8,
    dropout=(0.0, 0.0),
    switch_level=(False,),
)
DECODER = UNetConfig(
    **COMMON,
    patch_size=2,
    block_out_channels=(8, 16),
    num_attention_heads=(0, 1),
    down_num_layers_per_block=(1, 1),
    up_num_layers_per_block=(1, 1),
    up_blocks_repeat_mappers=(2, 2),
    block_types_per_layer=((R, T), (R, T, A)),
    effnet_in_channels=4,
    pixel_mapper_in_channels=3,
    timestep_conditioning_type=("sca",),
    dropout=(0.0, 0.0),
)
VQGAN = StageAConfig(levels=2, bottleneck_blocks=1, embed_dim=16, num_vq_embeddings=16)
TEXT = CLIPTextConfig(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    projection_dim=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=8,
)
BUILD: dict[str, tuple[Callable[[], nn.Module], dict]] = {
    "prior": (lambda: StableCascadeUNet(PRIOR), PRIOR.to_dict()),
    "decoder": (lambda: StableCascadeUNet(DECODER), DECODER.to_dict()),
    "vqgan": (lambda: StageA(VQGAN), {"_class_name": "PaellaVQModel", **VQGAN.to_dict()}),
    "text_encoder": (lambda: CLIPTextEncoder(TEXT), TEXT.to_dict()),
}


def _random_state(component: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        model = BUILD[component][0]()
    g = torch.Generator().manual_seed(7)
    out = {}
    for k, t in model.state_dict().items():
        if t.is_floating_point():
            out[k] = torch.randn(t.shape, generator=g)
        else:
            out[k] = torch.full(t.shape, 3, dtype=t.dtype)
    return out


def _load(path: Path, component: str, dtype: torch.dtype, **kw: object) -> nn.Module:
    with torch.device("meta"):
        model = BUILD[component][0]()
    return load_module(model, locate(path, component, **kw), device="cpu", dtype=dtype)


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert got[k].dtype == w.dtype and torch.equal(got[k], w), k


# A non-persistent buffer of transformers' CLIP text model; it is in state_dict() but not in files.
POSITION_IDS = "text_model.embeddings.position_ids"
LAYOUTS = {
    "official": {"layout": "official"},
    "diffusers": {},
    "sharded": {"max_shard_bytes": 4096},
    "bf16_variant": {"variant": "bf16", "dtype": torch.bfloat16},
}


@pytest.mark.parametrize(
    ("component", "layout"),
    [(c, lay) for lay in LAYOUTS for c in BUILD if (c, lay) != ("text_encoder", "official")],
)
def test_real_module_round_trip(tmp_path: Path, component: str, layout: str) -> None:
    ref = _random_state(component)
    kw = dict(LAYOUTS[layout])
    if layout != "official":
        kw["config"] = BUILD[component][1]
    write_component(ref, component, tmp_path, **kw)
    source = locate(tmp_path, component, variant=kw.get("variant"))
    assert source.layout == ("official" if layout == "official" else "diffusers")
    if layout == "sharded":
        assert len(source.files) > 1
    dtype = torch.bfloat16 if layout == "bf16_variant" else torch.float32
    model = _load(tmp_path, component, dtype, variant=kw.get("variant"))
    _same(
        model.state_dict(), {k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.items()}
    )


def _diffusers_model(component: str):
    torch.manual_seed(0)
    if component == "text_encoder":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.CLIPTextConfig(**TEXT.to_dict())
        return transformers.CLIPTextModelWithProjection(cfg)
    diffusers = pytest.importorskip("diffusers")
    if component == "vqgan":
        from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

        return PaellaVQModel(**VQGAN.to_dict())
    config = {k: v for k, v in BUILD[component][1].items() if not k.startswith("_")}
    return diffusers.StableCascadeUNet(**config)


@pytest.mark.parametrize("component", list(BUILD))
def test_files_saved_by_diffusers_and_transformers_load(tmp_path: Path, component: str) -> None:
    reference = _diffusers_model(component)
    reference.to(torch.bfloat16)
    theirs = {k: v for k, v in reference.state_dict().items() if k != POSITION_IDS}
    reference.save_pretrained(tmp_path, variant="bf16", max_shard_size=4096)
    source = locate(tmp_path, component, variant="bf16")
    assert len(source.files) > 1  # sharded, variant naming
    model = _load(tmp_path, component, torch.bfloat16, variant="bf16")
    _same(to_diffusers(component, model.state_dict()), theirs)


@pytest.mark.parametrize("component", list(BUILD))
def test_files_we_write_load_in_diffusers_and_transformers(tmp_path: Path, component: str) -> None:
    cls = type(_diffusers_model(component))
    ref = _random_state(component)
    write_component(
        ref,
        component,
        tmp_path,
        config=BUILD[component][1],
        variant="bf16",
        dtype=torch.bfloat16,
        max_shard_bytes=4096,
    )
    loaded = cls.from_pretrained(tmp_path, variant="bf16", torch_dtype=torch.bfloat16)
    want = {k: v.bfloat16() if v.is_floating_point() else v for k, v in ref.items()}
    got = {
        k: v for k, v in loaded.state_dict().items() if k != "text_model.embeddings.position_ids"
    }
    _same(got, to_diffusers(component, want))


PIPELINE_LAYOUTS = {
    "combined": ("prior", "decoder", "vqgan", "text_encoder"),
    "prior_repo": ("prior", "text_encoder"),
    "decoder_repo": ("prior", "decoder", "vqgan", "text_encoder"),  # prior: stage_c.safetensors
}


@pytest.mark.parametrize("repo", list(PIPELINE_LAYOUTS))
def test_folders_saved_by_diffusers_pipelines(tiny, repo: str) -> None:
    """The shared tiny cascade, saved by the diffusers pipelines' own save_pretrained."""
    root = getattr(tiny, repo)
    for component in PIPELINE_LAYOUTS[repo]:
        ours = tiny.ours[component]
        with torch.device("meta"):
            model = type(ours)(ours.config)
        load_module(model, locate(root, component), device="cpu", dtype=torch.float32)
        _same(model.state_dict(), ours.state_dict())
    assert locate(root, "tokenizer").folder == root / "tokenizer"
    assert locate(root, "scheduler").config["_class_name"] == "DDPMWuerstchenScheduler"
