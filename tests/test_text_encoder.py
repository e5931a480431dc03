"""CLIP text encoder parity with transformers' CLIPTextModelWithProjection on tiny random configs.

Tolerances: fp32 within 1e-4 absolute on O(1) outputs (observed ~1e-6); bf16 error against the
fp32 reference no worse than 2x transformers' own bf16 error plus 2% of the output range.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cascade_rt.models.text_encoder import BIGG, CLIPTextConfig, CLIPTextEncoder

transformers = pytest.importorskip("transformers")

VOCAB, EOS, BOS = 300, 299, 298
FP32_ATOL = 1e-4


def _tiny(**overrides) -> dict:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        projection_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    cfg.update(overrides)
    return cfg


def _pair(cfg: dict, seed: int) -> tuple[CLIPTextEncoder, torch.nn.Module]:
    ref = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():  # LayerNorms start at 1/0: move everything off its default
            p.copy_(
                torch.randn(p.shape, generator=g) * (0.5 if p.dim() == 1 else 0.2) + (p.dim() == 1)
            )
    ours = CLIPTextEncoder(CLIPTextConfig.from_dict(cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _batch(seed: int, lengths: list[int], n: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompts like the tokenizer makes: BOS, content, EOS, then `pad`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), n), pad, dtype=torch.int64)
    mask = torch.zeros(len(lengths), n, dtype=torch.int64)
    for i, k in enumerate(lengths):
        ids[i, 0] = BOS
        ids[i, 1 : k - 1] = torch.randint(2, VOCAB - 2, (k - 2,), generator=g)
        ids[i, k - 1] = EOS
        mask[i, :k] = 1
    return ids, mask


def _reference(ref, ids, mask):
    out = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-1], out.last_hidden_state, out.text_embeds


def test_parameter_names_are_save_pretrained_keys(tmp_path: Path) -> None:
    cfg = _tiny()
    transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**cfg)).save_pretrained(
        tmp_path
    )
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    config = CLIPTextConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert config == CLIPTextConfig(**cfg)
    with torch.device("meta"):
        ours = CLIPTextEncoder(config)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == saved


def test_bigg_preset_shapes() -> None:
    with torch.device("meta"):
        model = CLIPTextEncoder(BIGG)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 694.66e6) < 0.01e6, n  # §8.1
    assert model.state_dict()["text_projection.weight"].shape == (1280, 1280)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        CLIPTextConfig.from_dict(_tiny(hidden_act="relu"))
    with pytest.raises(ValueError, match="not divisible"):
        CLIPTextConfig.from_dict(_tiny(num_attention_heads=5))
    nested = CLIPTextConfig.from_dict({"text_config": _tiny(), "projection_dim": 7})
    assert nested.projection_dim == 48


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
@pytest.mark.parametrize("pad", [EOS, 0])
@torch.no_grad()
def test_fp32_matches_transformers(act: str, pad: int) -> None:
    ours, ref = _pair(_tiny(hidden_act=act), seed=1)
    ids, mask = _batch(seed=2, lengths=[16, 3, 9, 2], n=16, pad=pad)
    pre, post, emb = _reference(ref, ids, mask)

    h, e = ours(ids, mask)
    h2, e2 = ours(ids, mask, output="post_ln")
    errs = [(a - b).abs().max().item() for a, b in ((h, pre), (e, emb), (h2, post), (e2, emb))]
    print(f"CLIP fp32 {act} pad={pad}: max abs err pre_ln/embeds/post_ln {errs[:3]}")
    assert h.shape == (4, 16, 64) and e.shape == (4, 48)
    assert max(errs) < FP32_ATOL, errs
    assert (pre - post).abs().max() > 0.1  # the two outputs really differ


@torch.no_grad()
def test_no_mask_and_legacy_eos_rule() -> None:
    # Without an attention_mask only the causal mask applies; eos_token_id == 2 pools at argmax.
    for eos_id in (EOS, 2):
        ours, ref = _pair(_tiny(eos_token_id=eos_id), seed=3)
        ids, _ = _batch(seed=4, lengths=[7, 12], n=12, pad=0)
        pre, _, emb = _reference(ref, ids, None)
        h, e = ours(ids)
        torch.testing.assert_close(h, pre, rtol=0, atol=FP32_ATOL)
        torch.testing.assert_close(e, emb, rtol=0, atol=FP32_ATOL)


@torch.no_grad()
def test_bf16_within_twice_transformers_error() -> None:
    ours, ref = _pair(_tiny(), seed=5)
    ids, mask = _batch(seed=6, lengths=[16, 5, 11], n=16, pad=EOS)
    pre32, post32, emb32 = _reference(ref, ids, mask)
    ours.to(torch.bfloat16)
    ref.to(torch.bfloat16)
    pre, post, emb = _reference(ref, ids, mask)
    h, e = ours(ids, mask)
    h2, _ = ours(ids, mask, output="post_ln")
    for name, got, theirs, exact in (
        ("pre_ln", h, pre, pre32),
        ("post_ln", h2, post, post32),
        ("text_embeds", e, emb, emb32),
    ):
        assert got.dtype == torch.bfloat16
        err = (got.float() - exact).abs().max().item()
        err_ref = (theirs.float() - exact).abs().max().item()
        print(f"CLIP bf16 {name}: ours {err:.3e}, transformers {err_ref:.3e}")
        assert err <= 2 * err_ref + 0.02 * exact.abs().max().item(), (name, err, err_ref)


def test_rejects_bad_inputs() -> None:
    model = CLIPTextEncoder(CLIPTextConfig.from_dict(_tiny()))
    ids, mask = _batch(seed=0, lengths=[4], n=8, pad=EOS)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids, mask[:, :5])
    with pytest.raises(ValueError, match="output must be"):
        model(ids, mask, output="penultimate")
