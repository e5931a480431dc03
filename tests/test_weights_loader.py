"""load_module on tiny stand-in modules whose parameter names are the real canonical keys."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from cascade_rt.weights import CheckpointError, load_module, locate, write_component
from cascade_rt.weights.safetensors_io import write_safetensors

C = 8


class AttnBlock(nn.Module):
    """Names of SC's AttnBlock: attention.attn is an nn.MultiheadAttention (fused in_proj)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.attn = nn.MultiheadAttention(c, 2, batch_first=True)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(3, c))


class TinyStageC(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.clip_txt_mapper = nn.Linear(3, C)
        self.clip_txt_pooled_mapper = nn.Linear(3, 2 * C)
        self.down_blocks = nn.ModuleList(
            [nn.ModuleList([nn.Conv2d(C, C, 3, groups=C), nn.Linear(4, C), AttnBlock(C)])]
        )


class TinyStageB(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.effnet_mapper = nn.Sequential(nn.Conv2d(2, C, 1), nn.GELU(), nn.Conv2d(C, C, 1))
        self.clip_mapper = nn.Linear(3, 2 * C)
        self.down_blocks = nn.ModuleList([nn.ModuleList([nn.Linear(C, C), AttnBlock(C)])])


class TinyStageA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.in_block = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, C, 1))
        self.down_blocks = nn.Sequential(nn.Conv2d(C, 4, 1), nn.BatchNorm2d(4))
        self.vquantizer = nn.Module()
        self.vquantizer.codebook = nn.Embedding(16, 4)


class TinyText(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(10, C)
        self.text_model.final_layer_norm = nn.LayerNorm(C)
        self.text_projection = nn.Linear(C, C, bias=False)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "prior": TinyStageC,
    "decoder": TinyStageB,
    "vqgan": TinyStageA,
    "text_encoder": TinyText,
}


def _reference(component: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    model = MODELS[component]()
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_()  # LayerNorm/BatchNorm start at exact 0/1: make every value count
        if component == "vqgan":
            model.get_submodule("down_blocks.1").num_batches_tracked.fill_(7)
    return model.state_dict()


def _meta(component: str) -> nn.Module:
    with torch.device("meta"):
        return MODELS[component]()


def _load(
    path: Path, component: str, dtype: torch.dtype = torch.float32, **kw: object
) -> nn.Module:
    return load_module(_meta(component), locate(path, component, **kw), device="cpu", dtype=dtype)


def _assert_equal(model: nn.Module, ref: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    got = model.state_dict()
    assert got.keys() == ref.keys()
    for k, want in ref.items():
        if want.is_floating_point():
            want = want.to(dtype)
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


WRITES = {
    "official": {"layout": "official"},
    "diffusers": {"config": {}},
    "sharded": {"config": {}, "max_shard_bytes": 200},
    "bf16_variant": {"config": {}, "variant": "bf16", "dtype": torch.bfloat16},
}


# The text encoder exists only in the Hugging Face layout.
CASES = [(c, h) for h in WRITES for c in MODELS if (c, h) != ("text_encoder", "official")]


@pytest.mark.parametrize(("component", "how"), CASES)
def test_round_trip(tmp_path: Path, component: str, how: str) -> None:
    ref = _reference(component)
    files = write_component(ref, component, tmp_path, **WRITES[how])
    assert (how == "sharded") == any(p.name.endswith(".index.json") for p in files)
    model = _load(tmp_path, component, variant=WRITES[how].get("variant"))
    if how == "bf16_variant":  # bf16 file cast up to fp32: exactly the bf16 values
        ref = {k: v.bfloat16() if v.is_floating_point() else v for k, v in ref.items()}
    _assert_equal(model, ref, torch.float32)
    assert not any(t.is_meta for t in model.state_dict().values())
    # fp32 files on CPU: only fused q/k/v rows and casts need arena bytes; the rest is mapped.
    payload = sum(t.numel() * t.element_size() for t in ref.values())
    fused = sum(t.numel() * 4 for k, t in ref.items() if ".in_proj_" in k and how != "official")
    if how == "bf16_variant":
        assert model.mapped_bytes == sum(
            t.nbytes for t in ref.values() if not t.is_floating_point()
        )
    else:
        assert model.mapped_bytes == payload - fused


def test_legacy_clip_position_ids_are_skipped(tmp_path: Path) -> None:
    ref = _reference("text_encoder")
    legacy = {**ref, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    write_component(legacy, "text_encoder", tmp_path)
    _assert_equal(_load(tmp_path, "text_encoder"), ref, torch.float32)


def test_fp32_file_cast_to_bf16_and_int_buffer_kept(tmp_path: Path) -> None:
    ref = _reference("vqgan")
    write_component(ref, "vqgan", tmp_path, layout="official")
    model = _load(tmp_path, "vqgan", torch.bfloat16)
    _assert_equal(model, ref, torch.bfloat16)
    assert model.down_blocks[1].num_batches_tracked.dtype == torch.int64


def test_fused_qkv_round_trip_through_diffusers_files(tmp_path: Path) -> None:
    ref = _reference("prior")
    write_component(ref, "prior", tmp_path, config={})
    fused = ref["down_blocks.0.2.attention.attn.in_proj_weight"]
    with safe_open(tmp_path / "diffusion_pytorch_model.safetensors", framework="pt") as f:
        for i, name in enumerate("qkv"):
            part = f.get_tensor(f"down_blocks.0.2.attention.to_{name}.weight")
            assert torch.equal(part, fused[i * C : (i + 1) * C])
        assert "down_blocks.0.2.attention.to_out.0.bias" in f.keys()  # noqa: SIM118
    model = _load(tmp_path, "prior")
    _assert_equal(model, ref, torch.float32)


def test_all_weights_share_one_arena(tmp_path: Path) -> None:
    ref = _reference("decoder")
    write_component(ref, "decoder", tmp_path, config={})
    model = _load(tmp_path, "decoder", torch.float16)
    storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert len(storages) == 1  # every tensor is cast, so none is a view of the file
    assert model.mapped_bytes == 0 and model._weight_maps == ()
    payload = sum(t.numel() * 2 for t in ref.values())
    assert payload <= model.arena_bytes < payload + 256 * len(ref)


def _all_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in model.state_dict().values())


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    ref = _reference("prior")
    del ref["clip_txt_mapper.bias"]
    ref["clip_img_mapper.weight"] = torch.ones(2)
    write_component(ref, "prior", tmp_path, layout="official")
    model = _meta("prior")
    with pytest.raises(
        CheckpointError,
        match=r"stage_c\.safetensors \(official prior\) does not fit the module: "
        r"1 missing keys \[clip_txt_mapper\.bias\], 1 unexpected keys \[clip_img_mapper\.weight\]",
    ):
        load_module(model, locate(tmp_path, "prior"), device="cpu", dtype=torch.float32)
    assert _all_meta(model)


def test_shape_mismatch_names_file_key_expected_actual(tmp_path: Path) -> None:
    ref = _reference("prior")
    ref["down_blocks.0.2.attention.attn.in_proj_weight"] = torch.zeros(3 * C, C + 1)
    write_component(ref, "prior", tmp_path, config={})
    with pytest.raises(
        CheckpointError,
        match=r"diffusion_pytorch_model\.safetensors: 3 shape mismatches: "
        r"diffusion_pytorch_model\.safetensors: key 'down_blocks\.0\.2\.attention\.to_q\.weight' "
        r"expected shape \[8, 8\], found \[8, 9\]",
    ):
        _load(tmp_path, "prior")


def test_unsupported_dtype(tmp_path: Path) -> None:
    ref = _reference("decoder")
    ref["clip_mapper.weight"] = ref["clip_mapper.weight"].double()
    write_component(ref, "decoder", tmp_path, layout="official")
    with pytest.raises(
        CheckpointError,
        match=r"stage_b\.safetensors: key 'clip_mapper\.weight' has unsupported dtype F64 "
        r"for a torch\.float32 tensor \(supported: F32, F16, BF16\)",
    ):
        _load(tmp_path, "decoder")


def test_failed_copy_leaves_module_on_meta(tmp_path: Path) -> None:
    write_component(_reference("prior"), "prior", tmp_path, layout="official")
    source = locate(tmp_path, "prior")
    path = tmp_path / "stage_c.safetensors"
    path.write_bytes(path.read_bytes()[:-16])  # truncated after the header was read
    model = _meta("prior")
    params = dict(model.named_parameters())
    with pytest.raises(
        CheckpointError, match=r"stage_c\.safetensors: key '.*': file ends \d+ bytes early"
    ):
        load_module(model, source, device="cpu", dtype=torch.float32)
    assert _all_meta(model)
    assert all(p is params[n] for n, p in model.named_parameters())


def test_failure_while_assigning_puts_meta_tensors_back(tmp_path: Path) -> None:
    write_component(_reference("prior"), "prior", tmp_path, layout="official")
    model = _meta("prior")
    params = dict(model.named_parameters())
    calls: list[int] = []

    def fail_once(*args: object) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("assignment failed")

    # Runs after clip_txt_mapper & co. were assigned: they must go back to meta.
    model.down_blocks[0][2].register_load_state_dict_pre_hook(fail_once)
    with pytest.raises(RuntimeError, match="assignment failed"):
        load_module(model, locate(tmp_path, "prior"), device="cpu", dtype=torch.float32)
    assert _all_meta(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not hasattr(model, "arena_bytes")


def test_module_must_be_on_meta_and_fully_persistent(tmp_path: Path) -> None:
    write_component(_reference("text_encoder"), "text_encoder", tmp_path)
    source = locate(tmp_path, "text_encoder")
    with pytest.raises(ValueError, match=r"TinyText must be built on the meta device; 4 tensors"):
        load_module(TinyText(), source, device="cpu", dtype=torch.float32)
    model = _meta("text_encoder")
    model.register_buffer("position_ids", torch.empty(3, device="meta"), persistent=False)
    with pytest.raises(
        ValueError, match=r"non-persistent buffers the loader cannot fill: position_ids"
    ):
        load_module(model, source, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"run dtype must be one of"):
        load_module(_meta("text_encoder"), source, device="cpu", dtype=torch.float64)


def test_mixed_dtype_sharded_file_read_in_file_order(tmp_path: Path) -> None:
    # Half the tensors bf16, half fp32, across shards: both the direct and the staged copy paths.
    ref = _reference("prior")
    mixed = {k: v.bfloat16() if i % 2 else v for i, (k, v) in enumerate(ref.items())}
    write_component(mixed, "prior", tmp_path, config={}, max_shard_bytes=300)
    model = _load(tmp_path, "prior")
    _assert_equal(model, {k: v.float() for k, v in mixed.items()}, torch.float32)


def test_writer_refuses_official_text_encoder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="text encoder has no official single-file layout"):
        write_component(_reference("text_encoder"), "text_encoder", tmp_path, layout="official")
    with pytest.raises(ValueError, match="never sharded"):
        write_component(
            _reference("vqgan"), "vqgan", tmp_path, layout="official", max_shard_bytes=8
        )
    write_safetensors({}, tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="holds no recognisable weights, expected Stage A"):
        locate(tmp_path / "empty.safetensors", "vqgan")
