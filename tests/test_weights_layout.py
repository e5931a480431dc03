"""`locate` on every checkpoint layout, and its errors (synthetic files with the real key names)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cascade_rt.weights import CheckpointError, Source, locate, write_component, write_json

g = torch.Generator().manual_seed(0)


def _t(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _attention(prefix: str, c: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.attention.attn.in_proj_weight": _t(3 * c, c),
        f"{prefix}.attention.attn.in_proj_bias": _t(3 * c),
        f"{prefix}.attention.attn.out_proj.weight": _t(c, c),
        f"{prefix}.attention.attn.out_proj.bias": _t(c),
    }


def stage_c(c: int = 4) -> dict[str, torch.Tensor]:
    return {
        "clip_txt_mapper.weight": _t(c, 3),
        "clip_txt_pooled_mapper.weight": _t(2 * c, 3),
        **_attention("down_blocks.0.2", c),
    }


def stage_b(c: int = 4) -> dict[str, torch.Tensor]:
    return {
        "effnet_mapper.0.weight": _t(c, 2, 1, 1),
        "clip_mapper.weight": _t(c, 3),
        **_attention("down_blocks.1.2", c),
    }


def stage_a() -> dict[str, torch.Tensor]:
    return {
        "vquantizer.codebook.weight": _t(8, 4),
        "down_blocks.3.1.num_batches_tracked": torch.tensor(5),
    }


def text_encoder() -> dict[str, torch.Tensor]:
    return {"text_model.final_layer_norm.weight": _t(4), "text_projection.weight": _t(4, 4)}


MAKERS: dict[str, Callable[[], dict[str, torch.Tensor]]] = {
    "prior": stage_c,
    "decoder": stage_b,
    "vqgan": stage_a,
    "text_encoder": text_encoder,
}


def _tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({"a</w>": 0}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    write_json({"model_max_length": 77}, folder / "tokenizer_config.json")


def _scheduler(folder: Path, tag: str) -> None:
    folder.mkdir(parents=True)
    write_json(
        {"_class_name": "DDPMWuerstchenScheduler", "tag": tag}, folder / "scheduler_config.json"
    )


def _diffusers(root: Path, sub: str, component: str, **kw: object) -> None:
    write_component(MAKERS[component](), component, root / sub, config={"tag": sub}, **kw)


def _rel(src: Source, root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in src.files]


def test_combined_pipeline_save(tmp_path: Path) -> None:
    write_json({"_class_name": "StableCascadeCombinedPipeline"}, tmp_path / "model_index.json")
    _diffusers(tmp_path, "prior_prior", "prior")
    _diffusers(tmp_path, "decoder", "decoder")
    _diffusers(tmp_path, "vqgan", "vqgan")
    _diffusers(tmp_path, "prior_text_encoder", "text_encoder")
    _tokenizer(tmp_path / "prior_tokenizer")
    _scheduler(tmp_path / "prior_scheduler", "prior")
    _scheduler(tmp_path / "scheduler", "decoder")

    src = locate(tmp_path, "prior", lite=True)  # one prior in a combined save: lite is moot
    assert (src.layout, src.config["tag"]) == ("diffusers", "prior_prior")
    assert _rel(src, tmp_path) == ["prior_prior/diffusion_pytorch_model.safetensors"]
    assert _rel(locate(tmp_path, "decoder"), tmp_path) == [
        "decoder/diffusion_pytorch_model.safetensors"
    ]
    assert locate(tmp_path, "vqgan").layout == "diffusers"
    assert _rel(locate(tmp_path, "text_encoder"), tmp_path) == [
        "prior_text_encoder/model.safetensors"
    ]
    tok = locate(tmp_path, "tokenizer")
    assert tok.folder == tmp_path / "prior_tokenizer" and tok.config == {"model_max_length": 77}
    assert locate(tmp_path, "scheduler").config["tag"] == "decoder"


def test_hub_prior_repo(tmp_path: Path) -> None:
    write_json({"_class_name": "StableCascadePriorPipeline"}, tmp_path / "model_index.json")
    _diffusers(tmp_path, "prior", "prior")
    _diffusers(tmp_path, "prior", "prior", variant="bf16", dtype=torch.bfloat16)
    _diffusers(tmp_path, "prior_lite", "prior", variant="bf16", dtype=torch.bfloat16)
    _diffusers(tmp_path, "text_encoder", "text_encoder")

    src = locate(tmp_path, "prior")
    assert _rel(src, tmp_path) == ["prior/diffusion_pytorch_model.safetensors"]
    assert src.variant is None
    src = locate(tmp_path, "prior", variant="bf16")
    assert _rel(src, tmp_path) == ["prior/diffusion_pytorch_model.bf16.safetensors"]
    assert src.tensors["clip_txt_mapper.weight"].dtype == "BF16" and src.variant == "bf16"
    # Only the bf16 variant is present in prior_lite/: it is used without being asked for.
    src = locate(tmp_path, "prior", lite=True)
    assert _rel(src, tmp_path) == ["prior_lite/diffusion_pytorch_model.bf16.safetensors"]
    # A variant that is not there falls back to the plain file.
    assert locate(tmp_path, "text_encoder", variant="fp16").files[0].name == "model.safetensors"


def test_hub_decoder_repo_with_official_files(tmp_path: Path) -> None:
    _diffusers(tmp_path, "decoder_lite", "decoder")
    _diffusers(tmp_path, "vqgan", "vqgan")
    write_component(stage_b(), "decoder", tmp_path, layout="official", lite=True)
    write_component(
        stage_c(), "prior", tmp_path, layout="official", variant="bf16", dtype=torch.bfloat16
    )
    write_component(stage_a(), "vqgan", tmp_path, layout="official")

    assert locate(tmp_path, "decoder", lite=True).layout == "diffusers"  # the folder wins
    with pytest.raises(
        CheckpointError,
        match=r"no decoder under .*looked for decoder/, stage_b\.safetensors, "
        r"stage_b_bf16\.safetensors; found: .*decoder_lite/",
    ):
        locate(tmp_path, "decoder")
    src = locate(tmp_path, "prior")  # no stage_c.safetensors: the bf16 file is taken
    assert (_rel(src, tmp_path), src.layout, src.variant) == (
        ["stage_c_bf16.safetensors"],
        "official",
        "bf16",
    )
    src = locate(tmp_path / "stage_b_lite.safetensors", "decoder")
    assert (src.layout, src.config) == ("official", None)
    assert locate(tmp_path / "vqgan", "vqgan").layout == "diffusers"
    assert locate(tmp_path / "stage_a.safetensors", "vqgan").layout == "official"


def test_sharded_variant_folder_and_index_path(tmp_path: Path) -> None:
    files = write_component(
        stage_c(), "prior", tmp_path, variant="bf16", dtype=torch.bfloat16, max_shard_bytes=64
    )
    # bf16 bytes in diffusers order: 24 | 48 | q 32 + k 32 | v 32 + 3 biases 8 | out 32 + 8
    names = sorted(p.name for p in files)
    assert names == [
        *(f"diffusion_pytorch_model.bf16-0000{i}-of-00005.safetensors" for i in range(1, 6)),
        "diffusion_pytorch_model.safetensors.index.bf16.json",
    ]
    index = json.loads((tmp_path / names[-1]).read_text())
    assert index["metadata"]["total_size"] == 2 * sum(t.numel() for t in stage_c().values())
    assert len(locate(tmp_path, "prior", variant="bf16").files) == 5
    assert len(locate(tmp_path / names[-1], "prior").tensors) == 10  # 2 fused -> 2 x 3 pieces
    with pytest.raises(CheckpointError, match="is one shard; pass its folder"):
        locate(tmp_path / names[0], "prior")
    # Re-saving unsharded removes the stale shards and index of that variant.
    write_component(stage_c(), "prior", tmp_path, variant="bf16", dtype=torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "diffusion_pytorch_model.bf16.safetensors"
    ]


def test_text_encoder_shards_use_transformers_names(tmp_path: Path) -> None:
    write_component(text_encoder(), "text_encoder", tmp_path, max_shard_bytes=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    assert locate(tmp_path, "text_encoder").layout == "diffusers"


def test_file_of_another_stage(tmp_path: Path) -> None:
    write_component(stage_b(), "decoder", tmp_path, layout="official")
    (tmp_path / "stage_b.safetensors").rename(tmp_path / "stage_c.safetensors")
    with pytest.raises(
        CheckpointError, match=r"stage_c\.safetensors holds Stage B weights, expected Stage C"
    ):
        locate(tmp_path, "prior")
    _diffusers(tmp_path, "decoder", "decoder")
    with pytest.raises(
        CheckpointError,
        match=r"decoder/diffusion_pytorch_model\.safetensors holds Stage B weights, "
        r"expected Stage C",
    ):
        locate(tmp_path / "decoder", "prior")
    _diffusers(tmp_path, "vqgan", "vqgan")
    with pytest.raises(
        CheckpointError,
        match=r"config\.json describes \['PaellaVQModel'\], expected \['StableCascadeUNet'\]",
    ):
        locate(tmp_path / "vqgan", "decoder")
    write_component({"x.weight": torch.ones(1)}, "vqgan", tmp_path / "odd", layout="official")
    with pytest.raises(
        CheckpointError,
        match=r"stage_a\.safetensors holds no recognisable weights, expected Stage A",
    ):
        locate(tmp_path / "odd", "vqgan")


def test_nothing_found_lists_the_folder(tmp_path: Path) -> None:
    (tmp_path / "prior").mkdir()
    (tmp_path / "prior" / "notes.txt").write_text("")
    with pytest.raises(
        CheckpointError,
        match=r"prior has no diffusion_pytorch_model\[\.<variant>\]\.safetensors nor index json; "
        r"found: notes\.txt",
    ):
        locate(tmp_path, "prior")
    with pytest.raises(
        CheckpointError, match=r"no tokenizer under .*looked for tokenizer/; found: prior/"
    ):
        locate(tmp_path, "tokenizer")
    with pytest.raises(CheckpointError, match="does not exist"):
        locate(tmp_path / "nope", "prior")
    with pytest.raises(ValueError, match="unknown component 'stage_c'"):
        locate(tmp_path, "stage_c")


def test_several_variants_need_a_choice(tmp_path: Path) -> None:
    _diffusers(tmp_path, "vqgan", "vqgan", variant="bf16")
    _diffusers(tmp_path, "vqgan", "vqgan", variant="fp16")
    with pytest.raises(CheckpointError, match=r"several variants \['bf16', 'fp16'\]"):
        locate(tmp_path, "vqgan")
    assert locate(tmp_path, "vqgan", variant="fp16").variant == "fp16"


def test_inconsistent_index(tmp_path: Path) -> None:
    write_component(stage_c(), "prior", tmp_path, dtype=torch.bfloat16, max_shard_bytes=64)
    index_path = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["extra.weight"] = "diffusion_pytorch_model-00001-of-00005.safetensors"
    write_json(index, index_path)
    with pytest.raises(
        CheckpointError, match=r"lists 1 keys absent from its shards, e\.g\. \['extra\.weight'\]"
    ):
        locate(tmp_path, "prior")
    index["weight_map"]["extra.weight"] = "gone.safetensors"
    write_json(index, index_path)
    with pytest.raises(CheckpointError, match=r"lists shard gone\.safetensors which is not in"):
        locate(tmp_path, "prior")
    index["weight_map"]["extra.weight"] = "../x.safetensors"
    write_json(index, index_path)
    with pytest.raises(CheckpointError, match="must be a plain file name"):
        locate(tmp_path, "prior")


def test_legacy_variant_index_name(tmp_path: Path) -> None:
    write_component(stage_a(), "vqgan", tmp_path, variant="fp16", max_shard_bytes=8)
    new = tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json"
    new.rename(tmp_path / "diffusion_pytorch_model.safetensors.fp16.index.json")
    assert len(locate(tmp_path, "vqgan", variant="fp16").files) == 2
