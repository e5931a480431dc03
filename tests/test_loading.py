"""Every checkpoint layout loads into the same cascade: same weights, same image."""

from __future__ import annotations

import pytest
import torch

from cascade_rt import Cascade
from cascade_rt.loading import OFFICIAL_STAGE_A_SCALE
from cascade_rt.weights import CheckpointError

KWARGS = dict(
    prompt="a red fox",
    height=256,
    width=256,
    prior_num_inference_steps=2,
    num_inference_steps=2,
    decoder_guidance_scale=1.5,
    output_type="pt",
)


def _image(pipe: Cascade) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**KWARGS, generator=torch.Generator().manual_seed(5)).images


@pytest.fixture(scope="module")
def reference(tiny) -> torch.Tensor:
    return _image(Cascade.from_pretrained(tiny.combined, device="cpu", dtype=torch.float32))


def test_hub_repos(tiny, reference: torch.Tensor) -> None:
    pipe = Cascade.from_pretrained(
        tiny.prior_repo, decoder_path=tiny.decoder_repo, device="cpu", dtype=torch.float32
    )
    assert torch.equal(_image(pipe), reference)


def test_lite_folders(tiny, reference: torch.Tensor) -> None:
    pipe = Cascade.from_pretrained(
        tiny.prior_repo,
        decoder_path=tiny.decoder_repo,
        device="cpu",
        dtype=torch.float32,
        prior_lite=True,
        decoder_lite=True,
    )
    assert torch.equal(_image(pipe), reference)


def test_official_single_files(tiny, reference: torch.Tensor) -> None:
    pipe = Cascade.from_pretrained(tiny.official, device="cpu", dtype=torch.float32)
    assert pipe.vqgan_scale_factor == OFFICIAL_STAGE_A_SCALE
    pipe = Cascade.from_pretrained(
        tiny.official, device="cpu", dtype=torch.float32, vqgan_scale_factor=0.3764
    )
    assert (_image(pipe) - reference).abs().max().item() < 1e-6


def test_bfloat16_load_is_close(tiny, reference: torch.Tensor) -> None:
    pipe = Cascade.from_pretrained(tiny.combined, device="cpu", dtype=torch.bfloat16)
    assert pipe.prior.dtype == torch.bfloat16
    img = _image(pipe).float()
    err = (img - reference).abs().max().item()
    print(f"bf16 cascade vs fp32: max abs error {err:.3e} (pixel std {reference.std():.3f})")
    assert err < 0.1


def test_missing_component_names_the_folder(tiny, tmp_path) -> None:
    with pytest.raises(CheckpointError) as info:
        Cascade.from_pretrained(tmp_path, device="cpu")
    assert str(tmp_path) in str(info.value)
