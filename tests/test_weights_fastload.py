"""Fast loading: zero-copy file views on CPU, pre-faulted arenas, plan_load + fill, staging.

Stand-in Stage B modules whose parameter names are the real canonical keys; every comparison is
exact (a cast from the file dtype is deterministic), against the file's tensors as safetensors
itself reads them.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cascade_rt.weights import (
    Arena,
    CheckpointError,
    load_module,
    locate,
    plan_load,
    staging,
    write_component,
)
from cascade_rt.weights import loader as loader_mod
from cascade_rt.weights.safetensors_io import TensorInfo, read_header, write_safetensors

C = 8
HAS_CUDA = torch.cuda.is_available()
IN_PROJ = "down_blocks.0.1.attention.attn.in_proj_weight"


class AttnBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.attn = nn.MultiheadAttention(c, 2, batch_first=True)


class TinyStageB(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.effnet_mapper = nn.Sequential(nn.Conv2d(3, C, 1), nn.GELU(), nn.Conv2d(C, C, 1))
        self.clip_mapper = nn.Linear(5, 2 * C)
        self.down_blocks = nn.ModuleList([nn.ModuleList([nn.Linear(C, C), AttnBlock(C)])])


def _reference(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyStageB()
    with torch.no_grad():
        for t in model.state_dict().values():
            t.normal_()
    return model.state_dict()


def _meta() -> nn.Module:
    with torch.device("meta"):
        return TinyStageB()


def _load(path: Path, device: str, dtype: torch.dtype) -> nn.Module:
    return load_module(_meta(), locate(path, "decoder"), device=device, dtype=dtype)


def _inside(t: torch.Tensor, base: torch.Tensor) -> bool:
    start = base.data_ptr()
    return start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + base.nbytes


def _file_values(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The canonical tensors as the file holds them, cast to `dtype` by torch."""
    (path,) = folder.glob("*.safetensors")
    raw = load_file(path)
    fused = {k: v for k, v in raw.items() if not any(f".to_{n}." in k for n in "qkv")}
    for end in ("weight", "bias"):
        q, k, v = (raw[f"down_blocks.0.1.attention.to_{n}.{end}"] for n in "qkv")
        fused[f"down_blocks.0.1.attention.attn.in_proj_{end}"] = torch.cat([q, k, v])
    renamed = {
        k.replace(".to_out.0.", ".attn.out_proj.").replace(
            "clip_txt_pooled_mapper.", "clip_mapper."
        ): v
        for k, v in fused.items()
    }
    return {k: v.to(dtype) for k, v in renamed.items()}


def _assert_equal(model: nn.Module, want: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert got[k].dtype == w.dtype and torch.equal(got[k].cpu(), w), k


def test_official_fp32_file_is_mapped_not_copied(tmp_path: Path) -> None:
    ref = _reference()
    write_component(ref, "decoder", tmp_path, layout="official")
    model = _load(tmp_path, "cpu", torch.float32)
    (mapped,) = model._weight_maps
    assert mapped.numel() == (tmp_path / "stage_b.safetensors").stat().st_size
    for k, t in model.state_dict().items():
        assert _inside(t, mapped), k
        assert t.untyped_storage().data_ptr() == mapped.untyped_storage().data_ptr(), k
        assert torch.equal(t, ref[k]), k
    assert model.mapped_bytes == sum(t.nbytes for t in ref.values())
    assert model.arena_bytes == 0


def test_fused_qkv_go_to_the_arena_and_the_rest_is_mapped(tmp_path: Path) -> None:
    ref = _reference()
    write_component(ref, "decoder", tmp_path, config={})
    model = _load(tmp_path, "cpu", torch.float32)
    (mapped,) = model._weight_maps
    fused = {k for k in ref if ".in_proj_" in k}
    assert len(fused) == 2
    for k, t in model.state_dict().items():
        assert _inside(t, mapped) == (k not in fused), k
    _assert_equal(model, ref)
    assert model.mapped_bytes == sum(t.nbytes for k, t in ref.items() if k not in fused)
    assert sum(ref[k].nbytes for k in fused) <= model.arena_bytes < 2 * 256 + ref[IN_PROJ].nbytes


@pytest.mark.parametrize(
    ("file_dtype", "run_dtype"),
    [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float16),
    ],
)
def test_cast_tensors_equal_file_values(
    tmp_path: Path, file_dtype: torch.dtype, run_dtype: torch.dtype
) -> None:
    write_component(_reference(), "decoder", tmp_path, config={}, dtype=file_dtype)
    model = _load(tmp_path, "cpu", run_dtype)
    _assert_equal(model, _file_values(tmp_path, run_dtype))
    assert model.mapped_bytes == 0 and model._weight_maps == ()
    storages = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert len(storages) == 1  # one arena


def test_mapped_module_outlives_its_file(tmp_path: Path) -> None:
    ref = _reference()
    write_component(ref, "decoder", tmp_path, layout="official")
    model = _load(tmp_path, "cpu", torch.float32)
    (tmp_path / "stage_b.safetensors").unlink()
    gc.collect()
    x = torch.randn(4, 5)
    want = x.double() @ ref["clip_mapper.weight"].double().T + ref["clip_mapper.bias"].double()
    torch.testing.assert_close(model.clip_mapper(x).double(), want, rtol=1e-5, atol=1e-5)
    _assert_equal(model, ref)


def _text_file_with_misaligned_fp32(path: Path) -> dict[str, torch.Tensor]:
    # Sorted names: the 3-element bf16 tensor leaves the fp32 one at an offset of 6 bytes.
    tensors = {
        "text_model.a": torch.randn(3).bfloat16(),
        "text_model.b": torch.randn(5),
    }
    write_safetensors(tensors, path)
    assert read_header(path).tensors["text_model.b"].start % 4 == 2
    return tensors


class TinyMixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text_model = nn.Module()
        self.text_model.a = nn.Parameter(torch.empty(3))
        self.text_model.b = nn.Parameter(torch.empty(5))


@pytest.mark.parametrize("run_dtype", [torch.float32, torch.bfloat16])
def test_misaligned_tensor_is_copied(tmp_path: Path, run_dtype: torch.dtype) -> None:
    path = tmp_path / "model.safetensors"
    tensors = _text_file_with_misaligned_fp32(path)
    with torch.device("meta"):
        model = TinyMixed()
    load_module(model, locate(path, "text_encoder"), device="cpu", dtype=run_dtype)
    for name in "ab":
        got = getattr(model.text_model, name)
        assert torch.equal(got, tensors[f"text_model.{name}"].to(run_dtype)), name
    if run_dtype == torch.float32:
        assert model.mapped_bytes == 0 and model.arena_bytes > 0  # a needs a cast, b a copy


def test_plan_load_then_fill_equals_load_module(tmp_path: Path) -> None:
    write_component(_reference(), "decoder", tmp_path, config={}, dtype=torch.bfloat16)
    source = locate(tmp_path, "decoder")
    module = _meta()
    load = plan_load(module, source, torch.float32)
    assert all(t.is_meta for t in module.state_dict().values())  # nothing allocated or assigned
    assert list(load.specs) == list(module.state_dict())
    assert load.specs[IN_PROJ] == ((3 * C, C), torch.float32)
    arena = Arena(load.specs, "cpu")
    assert load.nbytes == arena.nbytes
    load.fill(arena.views)
    loaded = _load(tmp_path, "cpu", torch.float32)
    _assert_equal(loaded, arena.views)


def test_fill_checks_every_view_before_writing(tmp_path: Path) -> None:
    write_component(_reference(), "decoder", tmp_path, config={})
    load = plan_load(_meta(), locate(tmp_path, "decoder"), torch.float32)
    views = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in load.specs.items()}
    with pytest.raises(ValueError, match=r"1 views missing \[clip_mapper\.bias\], 1 unexpected"):
        load.fill(
            {**{k: v for k, v in views.items() if k != "clip_mapper.bias"}, "x": views[IN_PROJ]}
        )
    bad = {**views, "clip_mapper.weight": torch.zeros(5, 2 * C).T}
    with pytest.raises(
        ValueError,
        match=r"1 bad views: clip_mapper\.weight: \[16, 5\] "
        r"torch\.float32 non-contiguous, expected \[16, 5\] torch\.float32",
    ):
        load.fill(bad)
    with pytest.raises(ValueError, match=r"bad views: .*expected \[24, 8\] torch\.float32"):
        load.fill({**views, IN_PROJ: torch.zeros(3 * C, C, dtype=torch.float16)})
    assert all(not v.any() for v in views.values())  # nothing written


def test_bad_checkpoints_are_refused_before_anything_is_allocated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("allocated or mapped before every check passed")

    monkeypatch.setattr(loader_mod, "Arena", forbidden)
    monkeypatch.setattr(loader_mod, "map_file", forbidden)
    ref = _reference()
    bad_shape = {**ref, "clip_mapper.weight": torch.zeros(2 * C, 6)}
    write_component(bad_shape, "decoder", tmp_path / "shape", layout="official")
    with pytest.raises(CheckpointError, match=r"expected shape \[16, 5\], found \[16, 6\]"):
        _load(tmp_path / "shape", "cpu", torch.float32)
    write_component(ref, "decoder", tmp_path / "short", layout="official")
    path = tmp_path / "short" / "stage_b.safetensors"
    source = locate(path, "decoder")
    path.write_bytes(path.read_bytes()[:-8])
    module = _meta()
    with pytest.raises(
        CheckpointError,
        match=r"stage_b\.safetensors: key 'effnet_mapper\.2\.weight': file ends 8 bytes early",
    ):
        load_module(module, source, device="cpu", dtype=torch.float32)
    assert all(t.is_meta for t in module.state_dict().values())


def test_fill_rechecks_a_file_truncated_after_planning(tmp_path: Path) -> None:
    write_component(_reference(), "decoder", tmp_path, layout="official")
    load = plan_load(_meta(), locate(tmp_path, "decoder"), torch.float32)
    path = tmp_path / "stage_b.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    arena = Arena(load.specs, "cpu")
    with pytest.raises(CheckpointError, match=r"file ends 4 bytes early"):
        load.fill(arena.views)
    items = [(j.info, j.file_dtype, torch.empty(j.info.shape).view(-1)) for j in load.jobs]
    with pytest.raises(CheckpointError, match=r"file ends 4 bytes early"):
        staging.stream_copy(items, torch.device("cpu"))


def _info(name: str, start: int, nbytes: int, path: str = "f") -> TensorInfo:
    return TensorInfo(name, "F32", (nbytes // 4,), start, nbytes, Path(path))


def test_plan_batches_covers_every_byte_once_within_capacity() -> None:
    f4, b2 = torch.float32, torch.bfloat16
    items = [
        (_info("big", 16, 400), f4),  # split over several batches
        (_info("odd", 418, 6), b2),  # starts 2 mod 8: the next batch would begin at 416
        (_info("next", 424, 40), f4),
        (_info("empty", 464, 0), f4),
        (_info("other", 8, 24, "g"), f4),  # another file: a batch of its own
    ]
    batches = staging.plan_batches(items, capacity=64)
    covered: dict[int, list[tuple[int, int]]] = {}
    for b in batches:
        assert b.start % 8 == 0 and 0 < b.nbytes <= 64
        for s in b.segments:
            info, dtype = items[s.item]
            assert b.path == info.path and s.offset >= 0 and s.offset + s.nbytes <= b.nbytes
            assert s.nbytes % dtype.itemsize == 0
            # Byte `offset` of the batch is file byte start + offset: element `first` of the item.
            assert b.start + s.offset == info.start + s.first * dtype.itemsize
            covered.setdefault(s.item, []).append((s.first, s.nbytes // dtype.itemsize))
    for i, (info, dtype) in enumerate(items):
        spans = covered.get(i, [])
        assert [f for f, _ in spans] == [sum(n for _, n in spans[:j]) for j in range(len(spans))]
        assert sum(n for _, n in spans) == info.nbytes // dtype.itemsize, info.name
    assert len(batches) >= 400 // 64 + 2
    with pytest.raises(ValueError, match="multiple of 8 of at least 64, got 60"):
        staging.plan_batches(items, capacity=60)


@pytest.mark.parametrize("capacity", [64, 200, 1 << 20])
def test_stream_copy_on_cpu_matches_the_file(tmp_path: Path, capacity: int) -> None:
    # The CUDA path's batching and casts, run synchronously on CPU tensors.
    write_component(_reference(), "decoder", tmp_path, config={}, dtype=torch.float16)
    load = plan_load(_meta(), locate(tmp_path, "decoder"), torch.bfloat16)
    views = Arena(load.specs, "cpu").views
    items = []
    for j in load.jobs:
        view = views[j.key] if j.rows is None else views[j.key][j.rows[0] : j.rows[1]]
        items.append((j.info, j.file_dtype, view.view(-1)))
    staging.stream_copy(items, torch.device("cpu"), capacity)
    want = _file_values(tmp_path, torch.bfloat16)
    for k, w in want.items():
        assert torch.equal(views[k], w), k


def test_stream_copy_on_cpu_handles_misaligned_tensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    tensors = _text_file_with_misaligned_fp32(path)
    infos = read_header(path).tensors
    for run in (torch.float32, torch.float16):
        outs = {k: torch.empty(t.shape, dtype=run) for k, t in tensors.items()}
        items = [
            (infos[k], {"BF16": torch.bfloat16, "F32": torch.float32}[infos[k].dtype], outs[k])
            for k in tensors
        ]
        staging.stream_copy(items, torch.device("cpu"), 64)
        for k, t in tensors.items():
            assert torch.equal(outs[k], t.to(run)), (k, run)


def test_writes_to_mapped_weights_never_reach_the_file(tmp_path: Path) -> None:
    ref = _reference()
    write_component(ref, "decoder", tmp_path, layout="official")
    path = tmp_path / "stage_b.safetensors"
    before = path.read_bytes()
    model = _load(tmp_path, "cpu", torch.float32)
    with torch.no_grad():
        model.clip_mapper.weight.fill_(3.0)
    assert path.read_bytes() == before  # copy-on-write: the page became private
    assert torch.equal(model.clip_mapper.bias, ref["clip_mapper.bias"])


GPU = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@GPU
@needs_cuda
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("capacity", [256, None])
def test_cuda_load_equals_file_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_dtype: torch.dtype, capacity: int | None
) -> None:
    if capacity is not None:  # tiny staging buffers: tensors split across batches, many refills
        monkeypatch.setattr(staging, "STAGING_BYTES", capacity)
    write_component(_reference(), "decoder", tmp_path, config={}, dtype=file_dtype)
    model = _load(tmp_path, "cuda", torch.bfloat16)
    assert all(t.is_cuda for t in model.state_dict().values())
    assert model.mapped_bytes == 0 and model.arena_bytes > 0
    _assert_equal(model, _file_values(tmp_path, torch.bfloat16))


@GPU
@needs_cuda
def test_cuda_fill_into_caller_views(tmp_path: Path) -> None:
    write_component(_reference(), "decoder", tmp_path, config={})
    load = plan_load(_meta(), locate(tmp_path, "decoder"), torch.bfloat16)
    views = {k: torch.zeros(s, dtype=d, device="cuda") for k, (s, d) in load.specs.items()}
    load.fill(views)
    want = _file_values(tmp_path, torch.bfloat16)
    for k, w in want.items():
        assert torch.equal(views[k].cpu(), w), k
