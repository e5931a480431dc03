"""CLIP text transformer with projection, in the Hugging Face `CLIPTextModelWithProjection` layout.

Parameter names are exactly the keys transformers writes into `model.safetensors`
(`text_model.*`, `text_projection.weight`; the non-persistent `position_ids` buffer is not saved
and not needed here). The forward pass mirrors transformers 5.x numerically: pre-LN blocks,
causal self-attention combined with the key padding mask, the pooled vector taken at the first
EOS token of the final-LayerNorm output (§8.1, §13).

Stable Cascade conditions Stage C on the last block's output *before* `final_layer_norm`
(`hidden_states[-1]`); Würstchen v2 uses `last_hidden_state` (after it). `forward(output=...)`
selects which one comes back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    """Fields of a Hugging Face `text_encoder/config.json`; defaults are transformers' defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int | None = 49407

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig: hidden_act {self.hidden_act!r} is not supported; "
                f"expected one of {_ACTIVATIONS}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"CLIPTextConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.eos_token_id is None:
            raise ValueError("CLIPTextConfig: eos_token_id is required (it picks the pooled token)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
        """From a `CLIPTextConfig` dict, or a full `CLIPConfig` dict (uses its `text_config`).

        Keys that do not affect inference (dropout, initializer ranges, `architectures`, ...) are
        ignored; missing keys take transformers' defaults.
        """
        if "text_config" in d:
            d = d["text_config"] or {}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k, the Stable Cascade `text_encoder` (§8.1).
BIGG = CLIPTextConfig(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=49406,
    eos_token_id=49407,
)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.q_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # x: [B, L, C]; mask: [B, 1, L, L] bool (True = may attend) or None for causal only.
        b, n, c = x.shape
        heads = (b, n, self.num_heads, c // self.num_heads)
        q, k, v = (
            p(x).view(heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, L, D]
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.act = _quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)


class CLIPTextTransformer(nn.Module):
    """The `text_model.` subtree: embeddings, encoder layers, final LayerNorm."""

    def __init__(self, cfg: CLIPTextConfig) -> None:
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """CLIP text model + `text_projection` (no bias). Build on meta, then load weights."""

    def __init__(self, config: CLIPTextConfig = BIGG) -> None:
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def _eos_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B] index of the pooled token, by transformers' rule (tensor ops only, no sync)."""
        eos = self.config.eos_token_id
        if eos == 2:
            # Configs from before transformers PR #24773 carry eos_token_id 2; transformers then
            # pools at the largest id, which is the EOS token of the OpenAI vocab.
            return input_ids.argmax(dim=-1)
        # First EOS (padding may reuse the EOS id); argmax returns the first maximum.
        return (input_ids == eos).int().argmax(dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output: Literal["pre_ln", "post_ln"] = "pre_ln",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, L] int64, attention_mask [B, L] (1 = token, 0 = padding) or None.

        Returns (hidden [B, L, C], text_embeds [B, P]):
        - output="pre_ln": hidden = transformers `hidden_states[-1]`, the last layer's output
          before `final_layer_norm` (Stable Cascade's `clip_text`);
        - output="post_ln": hidden = `last_hidden_state` (Würstchen v2).
        text_embeds = text_projection(final_layer_norm(h)[eos position]) either way.
        Padding must be on the right (as the tokenizer makes it): a left-padded row whose first
        key is masked would leave queries with no key to attend to.
        """
        cfg = self.config
        if input_ids.dim() != 2:
            raise ValueError(
                f"CLIPTextEncoder: input_ids must be [B, L], got {tuple(input_ids.shape)}"
            )
        b, n = input_ids.shape
        if n > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIPTextEncoder: sequence length {n} exceeds max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        if output not in ("pre_ln", "post_ln"):
            raise ValueError(
                f"CLIPTextEncoder: output must be 'pre_ln' or 'post_ln', got {output!r}"
            )
        tm = self.text_model
        emb = tm.embeddings
        h = emb.token_embedding(input_ids) + emb.position_embedding.weight[:n]  # [B, L, C]

        mask = None
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"CLIPTextEncoder: attention_mask shape {tuple(attention_mask.shape)} does not "
                    f"match input_ids {tuple(input_ids.shape)}"
                )
            # transformers masks a key j for query i unless j <= i and attention_mask[j] != 0.
            causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()  # [L, L]
            mask = causal & attention_mask.bool()[:, None, None, :]  # [B, 1, L, L]

        for layer in tm.encoder.layers:
            h = layer(h, mask)

        rows = torch.arange(b, device=h.device)
        pooled = tm.final_layer_norm(h[rows, self._eos_positions(input_ids)])  # [B, C]
        text_embeds = self.text_projection(pooled)  # [B, P]
        if output == "post_ln":
            h = tm.final_layer_norm(h)
        return h, text_embeds
