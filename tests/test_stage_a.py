"""Stage A (Paella VQGAN) parity with diffusers' PaellaVQModel on a tiny config.

Tolerances: fp32 outputs within 1e-4 absolute (observed ~1e-6); bf16 error against the fp32
reference no worse than 2x diffusers' own bf16 error (+ a small floor for near-zero errors),
following the "2x PyTorch's own error at the same precision" rule.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cascade_rt.models.stage_a import STAGE_A, STAGE_A_OFFICIAL, StageA, StageAConfig

# Key/shape listings of the released checkpoints, beside the repository (docs/design.md).
REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "checkpoints"
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason=f"reference listings not found at {REF}")
TINY = StageAConfig(embed_dim=32, bottleneck_blocks=2, num_vq_embeddings=64)
FP32_ATOL = 1e-4

diffusers_vq = pytest.importorskip(
    "diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model"
)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and buffer away from its default (gammas start at zero, BN at identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("gammas"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) / max(1, t[0].numel()) ** 0.5)


def _pair(seed: int = 0) -> tuple[StageA, torch.nn.Module]:
    ours = StageA(TINY).eval()
    _randomize(ours, seed)
    ref = diffusers_vq.PaellaVQModel(**TINY.to_dict()).eval()
    sd = {
        k.replace("vquantizer.codebook.", "vquantizer.embedding."): v
        for k, v in ours.state_dict().items()
    }
    ref.load_state_dict(sd, strict=True)
    return ours, ref


def _images(seed: int, b: int = 2, h: int = 24, w: int = 40) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@needs_ref
def test_meta_build_has_official_keys_and_shapes() -> None:
    with torch.device("meta"):
        model = StageA(STAGE_A_OFFICIAL)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    official = json.loads((REF / "stage_a.json").read_text())
    assert ours == official["keys"]
    assert sum(p.numel() for p in model.parameters()) == official["num_params"]
    assert all(t.is_meta for t in model.state_dict().values())


@needs_ref
def test_presets_match_diffusers_config() -> None:
    cfg = json.loads((REF / "diffusers_vqgan.json").read_text())["config"]
    assert StageAConfig.from_dict(cfg) == STAGE_A
    assert StageAConfig.from_dict(STAGE_A.to_dict()) == STAGE_A
    assert STAGE_A_OFFICIAL.scale_factor == 0.43
    assert {k: v for k, v in STAGE_A_OFFICIAL.to_dict().items() if k != "scale_factor"} == {
        k: v for k, v in STAGE_A.to_dict().items() if k != "scale_factor"
    }


@needs_ref
def test_config_from_checkpoint_shapes() -> None:
    official = json.loads((REF / "stage_a.json").read_text())["keys"]
    assert StageAConfig.from_shapes(official) == STAGE_A_OFFICIAL
    diffusers_keys = json.loads((REF / "diffusers_vqgan.json").read_text())["keys"]
    assert StageAConfig.from_shapes(diffusers_keys, scale_factor=0.3764) == STAGE_A
    other = StageAConfig(levels=3, bottleneck_blocks=3, embed_dim=64, num_vq_embeddings=32)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in StageA(other).state_dict().items()}
    assert StageAConfig.from_shapes(shapes, scale_factor=other.scale_factor) == other
    with pytest.raises(ValueError, match="not a Stage A checkpoint"):
        StageAConfig.from_shapes({"in_block.1.weight": (192, 12, 1, 1)})


def test_config_errors_and_legacy_names() -> None:
    with pytest.raises(ValueError, match="unknown keys"):
        StageAConfig.from_dict({"embed_dim": 32, "c_hiden": 3})
    legacy = StageAConfig.from_dict({"c_hidden": 32, "c_latent": 4, "codebook_size": 64})
    assert (legacy.embed_dim, legacy.latent_channels, legacy.num_vq_embeddings) == (32, 4, 64)
    with pytest.raises(ValueError, match="divisible"):
        StageAConfig(embed_dim=33)


def test_diffusers_state_dict_differs_only_by_codebook_name() -> None:
    ref = diffusers_vq.PaellaVQModel(**TINY.to_dict())
    ours = StageA(TINY)
    renamed = {
        k.replace("vquantizer.embedding.", "vquantizer.codebook."): tuple(v.shape)
        for k, v in ref.state_dict().items()
    }
    assert renamed == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


@torch.no_grad()
def test_fp32_encode_quantize_decode_match_diffusers() -> None:
    ours, ref = _pair(seed=1)
    x = _images(seed=2)

    lat = ours.encode(x)
    lat_ref = ref.encode(x).latents
    assert lat.shape == (2, 4, 6, 10)
    assert lat.is_contiguous(memory_format=torch.channels_last)
    err_enc = (lat - lat_ref).abs().max().item()
    assert err_enc < FP32_ATOL, err_enc

    q, idx = ours.quantize(lat)
    q_ref, _, (_, _, idx_ref) = ref.vquantizer(lat_ref)
    assert idx.dtype == torch.int64 and idx.shape == (2, 6, 10)
    assert torch.equal(idx, idx_ref.view(2, 6, 10))
    torch.testing.assert_close(q, q_ref, rtol=0, atol=FP32_ATOL)

    z = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(3))
    img = ours.decode(z)
    img_ref = ref.decode(z, force_not_quantize=True).sample
    assert img.shape == (2, 3, 24, 40) and img.is_contiguous()
    err_dec = (img - img_ref).abs().max().item()
    assert err_dec < FP32_ATOL, err_dec

    # decode(quantized) is diffusers' decode with force_not_quantize=False
    img_q = ref.decode(lat_ref, force_not_quantize=False).sample
    torch.testing.assert_close(ours.decode(q), img_q, rtol=0, atol=FP32_ATOL)
    print(f"stage A fp32 max abs err: encode {err_enc:.2e}, decode {err_dec:.2e}")


@torch.no_grad()
def test_bf16_within_twice_diffusers_error() -> None:
    ours, ref = _pair(seed=4)
    x = _images(seed=5, b=1, h=16, w=28)
    z = torch.randn(1, 4, 4, 7, generator=torch.Generator().manual_seed(6))
    lat32 = ref.encode(x).latents
    img32 = ref.decode(z).sample
    ours.to(torch.bfloat16)
    ref.to(torch.bfloat16)
    xb, zb = x.bfloat16(), z.bfloat16()
    for name, got, theirs, exact in (
        ("encode", ours.encode(xb), ref.encode(xb).latents, lat32),
        ("decode", ours.decode(zb), ref.decode(zb).sample, img32),
    ):
        assert got.dtype == torch.bfloat16
        err = (got.float() - exact).abs().max().item()
        err_ref = (theirs.float() - exact).abs().max().item()
        print(f"stage A bf16 {name}: ours {err:.3e}, diffusers {err_ref:.3e}")
        assert err <= 2 * err_ref + 1e-2 * exact.abs().max().item(), (name, err, err_ref)

    q, idx = ours.quantize(ours.encode(xb))
    book = ours.vquantizer.codebook.weight
    assert torch.equal(q.permute(0, 2, 3, 1).reshape(-1, 4), book[idx.view(-1)])


def test_encode_rejects_bad_sizes() -> None:
    model = StageA(TINY)
    with pytest.raises(ValueError, match="multiple of 4"):
        model.encode(torch.rand(1, 3, 10, 12))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode(torch.rand(1, 4, 12, 12))
    with pytest.raises(ValueError, match="latents must be"):
        model.decode(torch.rand(1, 3, 4, 4))
