"""UNetConfig: Stage B / Stage C hyper-parameters with the diffusers config names (§3.3, §4.3).

Built from a diffusers `config.json` dict or the Stability `StageB`/`StageC` argument names
(`from_dict`), or inferred from an official single-file checkpoint's keys and shapes
(`from_official_keys`). STAGE_C, STAGE_C_LITE, STAGE_B, STAGE_B_LITE are the released models.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cascade_rt.models.unet_blocks import ATTN, BLOCK_TYPES, RES, TIMESTEP

HEAD_DIM = 64  # every released Stage B/C model (§2); used to infer head counts from weights
_LETTERS = {"C": RES, "T": TIMESTEP, "A": ATTN}
# Stability `StageB`/`StageC` argument names -> diffusers names (§3.3). `blocks`,
# `block_repeat` ([down, up] pairs) and `level_config` (letters) are translated separately.
_LEGACY_NAMES = {
    "c_in": "in_channels",
    "c_out": "out_channels",
    "c_r": "timestep_ratio_embedding_dim",
    "c_cond": "conditioning_dim",
    "c_hidden": "block_out_channels",
    "nhead": "num_attention_heads",
    "c_clip_text": "clip_text_in_channels",
    "c_clip_text_pooled": "clip_text_pooled_in_channels",
    "c_clip": "clip_text_pooled_in_channels",
    "c_clip_img": "clip_image_in_channels",
    "c_clip_seq": "clip_seq",
    "c_effnet": "effnet_in_channels",
    "c_pixels": "pixel_mapper_in_channels",
    "t_conds": "timestep_conditioning_type",
}
_LEGACY_PAIRS = {
    "blocks": ("down_num_layers_per_block", "up_num_layers_per_block"),
    "block_repeat": ("down_blocks_repeat_mappers", "up_blocks_repeat_mappers"),
}
_PER_LEVEL = (
    "block_out_channels",
    "num_attention_heads",
    "down_num_layers_per_block",
    "up_num_layers_per_block",
    "down_blocks_repeat_mappers",
    "up_blocks_repeat_mappers",
)
_T_COND_ORDER = ("sca", "crp")  # the released order; a safetensors header sorts keys instead


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _listify(value: Any) -> Any:
    return [_listify(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class UNetConfig:
    """Stage B/C hyper-parameters: the fields and defaults of diffusers' StableCascadeUNet.

    Per-level tuples run shallow -> deep, except `up_num_layers_per_block` and
    `up_blocks_repeat_mappers`, which run deep -> shallow (the order the up path visits levels).
    """

    in_channels: int = 16
    out_channels: int = 16
    timestep_ratio_embedding_dim: int = 64
    patch_size: int = 1
    conditioning_dim: int = 2048
    block_out_channels: tuple[int, ...] = (2048, 2048)
    num_attention_heads: tuple[int, ...] = (32, 32)
    down_num_layers_per_block: tuple[int, ...] = (8, 24)
    up_num_layers_per_block: tuple[int, ...] = (24, 8)
    down_blocks_repeat_mappers: tuple[int, ...] = (1, 1)
    up_blocks_repeat_mappers: tuple[int, ...] = (1, 1)
    block_types_per_layer: tuple[tuple[str, ...], ...] = ((RES, TIMESTEP, ATTN),) * 2
    clip_text_in_channels: int | None = None
    clip_text_pooled_in_channels: int = 1280
    clip_image_in_channels: int | None = None
    clip_seq: int = 4
    effnet_in_channels: int | None = None
    pixel_mapper_in_channels: int | None = None
    kernel_size: int = 3
    dropout: float | tuple[float, ...] = (0.1, 0.1)
    self_attn: bool | tuple[bool, ...] = True
    timestep_conditioning_type: tuple[str, ...] = ("sca", "crp")
    switch_level: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        for name in (*_PER_LEVEL, "timestep_conditioning_type", "block_types_per_layer"):
            if not isinstance(getattr(self, name), list | tuple):
                raise TypeError(f"UNetConfig: {name} must be a list, got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("dropout", "self_attn", "switch_level"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        types = tuple(tuple(level) for level in self.block_types_per_layer)
        object.__setattr__(self, "block_types_per_layer", types)
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"UNetConfig: {msg}")

        n = self.num_levels
        if n < 1:
            fail("block_out_channels must name at least one level")
        for name in (*_PER_LEVEL, "block_types_per_layer"):
            if len(getattr(self, name)) != n:
                fail(f"{name} has {len(getattr(self, name))} entries for {n} levels")
        for name in ("dropout", "self_attn"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                fail(f"{name} has {len(value)} entries for {n} levels")
        if self.switch_level is not None and len(self.switch_level) != n - 1:
            fail(f"switch_level needs {n - 1} entries (one per level transition)")
        if min(self.down_blocks_repeat_mappers + self.up_blocks_repeat_mappers) < 1:
            fail("repeat mapper counts must be >= 1")
        for i, types in enumerate(self.block_types_per_layer):
            bad = [t for t in types if t not in BLOCK_TYPES]
            if not types or bad:
                fail(f"level {i} block types {list(types)}: each must be one of {BLOCK_TYPES}")
            heads, c = self.num_attention_heads[i], self.block_out_channels[i]
            if ATTN in types and (heads <= 0 or c % heads):
                fail(f"level {i}: {c} channels cannot be split into {heads} attention heads")
        if self.patch_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            fail("patch_size must be >= 1 and kernel_size odd")
        if self.timestep_ratio_embedding_dim < 4:
            fail("timestep_ratio_embedding_dim must be >= 4")
        if len(set(self.timestep_conditioning_type)) != len(self.timestep_conditioning_type):
            fail(f"repeated timestep_conditioning_type {self.timestep_conditioning_type}")

    # ---------------------------------------------------------------- derived facts
    @property
    def num_levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def is_decoder(self) -> bool:
        """Stage B layout (effnet conditioning; pooled mapper named `clip_mapper`)."""
        return self.effnet_in_channels is not None

    @property
    def pooled_mapper_name(self) -> str:
        """Canonical module name of the pooled-text mapper (official StageB vs StageC)."""
        return "clip_mapper" if self.is_decoder else "clip_txt_pooled_mapper"

    def level_self_attn(self, level: int) -> bool:
        return self.self_attn if isinstance(self.self_attn, bool) else self.self_attn[level]

    # ---------------------------------------------------------------- conversions
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        """From a diffusers `config.json` dict or the Stability `StageB`/`StageC` argument names.

        Keys starting with "_" are ignored; unknown or doubly given keys raise ValueError.
        Missing keys take the diffusers defaults.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}

        def put(name: str, value: Any, key: str) -> None:
            if name in kwargs:
                raise ValueError(f"UNetConfig.from_dict: {name!r} given twice (again as {key!r})")
            kwargs[name] = value

        for key, value in d.items():
            if key.startswith("_"):
                continue
            if key in names:
                put(key, value, key)
            elif key in _LEGACY_NAMES:
                put(_LEGACY_NAMES[key], value, key)
            elif key in _LEGACY_PAIRS:
                if len(value) != 2:
                    raise ValueError(f"UNetConfig.from_dict: {key!r} must be [down, up]")
                for name, part in zip(_LEGACY_PAIRS[key], value, strict=True):
                    put(name, part, key)
            elif key == "level_config":
                bad = {ch for level in value for ch in level} - set(_LETTERS)
                if bad:
                    raise ValueError(
                        f"UNetConfig.from_dict: level_config letters {sorted(bad)} unsupported; "
                        f"known: {sorted(_LETTERS)} (ResBlock, TimestepBlock, AttnBlock)"
                    )
                put("block_types_per_layer", [[_LETTERS[ch] for ch in lv] for lv in value], key)
            else:
                raise ValueError(f"UNetConfig.from_dict: unknown config key {key!r}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A diffusers `config.json` dict."""
        d: dict[str, Any] = {"_class_name": "StableCascadeUNet"}
        for f in dataclasses.fields(self):
            d[f.name] = _listify(getattr(self, f.name))
        return d

    @classmethod
    def from_official_keys(
        cls, shapes: Mapping[str, Sequence[int]], *, patch_size: int | None = None
    ) -> UNetConfig:
        """Infers the config of an official single-file checkpoint from its key -> shape map.

        Stage C has `clip_txt_mapper.weight`, Stage B `effnet_mapper.0.weight`. Not stored in the
        weights, hence assumed: head dim 64; patch size 1 (C) / 2 (B) unless given; t_conds in
        the order sca, crp; self-attention on; resampling off in Stage C level transitions.
        When the weights match a released model, its preset is returned (with its dropout and
        the unused head counts of attention-free levels); otherwise dropout is 0.
        """
        return _infer_config(cls, {k: tuple(v) for k, v in shapes.items()}, patch_size)


_BLOCK_KEY = re.compile(r"^(down|up)_blocks\.(\d+)\.(\d+)\.([a-z_]+)")
_KIND_BY_ATTR = {"depthwise": RES, "channelwise": RES, "attention": ATTN, "kv_mapper": ATTN}
_WHO = "UNetConfig.from_official_keys"


def _period(seq: list[str]) -> list[str]:
    """Shortest prefix whose repetition is `seq` (one layer's block types)."""
    for n in range(1, len(seq) + 1):
        if len(seq) % n == 0 and seq == seq[:n] * (len(seq) // n):
            return seq[:n]
    return seq


def _scan_blocks(s: Mapping[str, tuple[int, ...]]):
    """Block kinds in order per (down|up, list index), and the key prefix of each kind's first
    block (where its shapes are read)."""
    found: dict[tuple[str, int], dict[int, str]] = {}
    first: dict[str, str] = {}
    for key in s:
        if m := _BLOCK_KEY.match(key):
            part, index, j, attr = m[1], int(m[2]), int(m[3]), m[4]
            kind = _KIND_BY_ATTR.get(attr, TIMESTEP if attr.startswith("mapper") else None)
            if kind is None:
                raise ValueError(f"{_WHO}: unrecognised block key {key!r}")
            found.setdefault((part, index), {})[j] = kind
            first.setdefault(kind, f"{part}_blocks.{index}.{j}.")
    kinds: dict[tuple[str, int], list[str]] = {}
    for (part, index), by_j in found.items():
        if sorted(by_j) != list(range(len(by_j))):
            raise ValueError(f"{_WHO}: {part}_blocks.{index} has gaps in its block numbers")
        kinds[part, index] = [by_j[j] for j in range(len(by_j))]
    return kinds, first


def _infer_config(cls: type[UNetConfig], s: dict, patch_size: int | None) -> UNetConfig:
    def need(key: str) -> tuple[int, ...]:
        if key not in s:
            raise ValueError(f"{_WHO}: missing key {key!r}")
        return s[key]

    def count(prefix: str) -> int:  # repeats = 1 + number of repeat mappers
        return 1 + sum(1 for k in s if re.fullmatch(re.escape(prefix) + r"\d+\.weight", k))

    is_c, is_b = "clip_txt_mapper.weight" in s, "effnet_mapper.0.weight" in s
    if is_c == is_b:
        raise ValueError(
            f"{_WHO}: expected exactly one of clip_txt_mapper.weight (Stage C) and "
            f"effnet_mapper.0.weight (Stage B); found {'both' if is_c else 'neither'}"
        )
    p = patch_size if patch_size is not None else (1 if is_c else 2)
    emb, clf = need("embedding.1.weight"), need("clf.1.weight")
    if emb[1] % (p * p) or clf[0] % (p * p):
        raise ValueError(f"{_WHO}: stem channels {emb[1]}/{clf[0]} do not fit patch size {p}")
    kinds, first = _scan_blocks(s)
    if not kinds:
        raise ValueError(f"{_WHO}: no down_blocks/up_blocks keys")
    n = 1 + max(index for _, index in kinds)
    switch = "down_downscalers.1.1.blocks.0.weight" in s  # Stage C style level transitions
    down_conv = "blocks.0.weight" if switch else "weight"
    c = [emb[0]] + [need(f"down_downscalers.{i}.1.{down_conv}")[0] for i in range(1, n)]

    types, n_down, n_up, heads = [], [], [], []
    for i in range(n):
        down, up = kinds.get(("down", i), []), kinds.get(("up", n - 1 - i), [])
        pattern = _period(down or up)
        if not pattern:
            raise ValueError(f"{_WHO}: level {i} has no blocks")
        if any(got != pattern * (len(got) // len(pattern)) for got in (down, up)):
            raise ValueError(f"{_WHO}: level {i} blocks do not repeat one layer {pattern}")
        if ATTN in pattern and c[i] % HEAD_DIM:
            raise ValueError(f"{_WHO}: level {i} has {c[i]} channels, not a multiple of 64")
        types.append(tuple(pattern))
        n_down.append(len(down) // len(pattern))
        n_up.append(len(up) // len(pattern))
        heads.append(c[i] // HEAD_DIM if ATTN in pattern else 0)

    c_r, conds = 64, ()
    if TIMESTEP in first:
        stem = first[TIMESTEP] + "mapper"
        c_r = need(stem + ".weight")[1]
        names = {m[1] for k in s if (m := re.fullmatch(re.escape(stem) + r"_(\w+)\.weight", k))}
        known = tuple(x for x in _T_COND_ORDER if x in names)
        conds = known + tuple(sorted(names - set(known)))
    pooled = need("clip_txt_pooled_mapper.weight" if is_c else "clip_mapper.weight")
    if is_c:
        c_cond = need("clip_txt_mapper.weight")[0]
    elif ATTN in first:
        c_cond = need(first[ATTN] + "kv_mapper.1.weight")[1]
    else:
        c_cond = pooled[0] // 4  # no attention block to read it from: the released 4 tokens
    pixels = s.get("pixels_mapper.0.weight")
    cfg = cls(
        in_channels=emb[1] // (p * p),
        out_channels=clf[0] // (p * p),
        timestep_ratio_embedding_dim=c_r,
        patch_size=p,
        conditioning_dim=c_cond,
        block_out_channels=tuple(c),
        num_attention_heads=tuple(heads),
        down_num_layers_per_block=tuple(n_down),
        up_num_layers_per_block=tuple(reversed(n_up)),
        down_blocks_repeat_mappers=tuple(count(f"down_repeat_mappers.{i}.") for i in range(n)),
        up_blocks_repeat_mappers=tuple(count(f"up_repeat_mappers.{u}.") for u in range(n)),
        block_types_per_layer=tuple(types),
        clip_text_in_channels=need("clip_txt_mapper.weight")[1] if is_c else None,
        clip_text_pooled_in_channels=pooled[1],
        clip_image_in_channels=need("clip_img_mapper.weight")[1] if is_c else None,
        clip_seq=pooled[0] // c_cond,
        effnet_in_channels=None if is_c else need("effnet_mapper.0.weight")[1],
        pixel_mapper_in_channels=None if pixels is None else pixels[1],
        kernel_size=need(first[RES] + "depthwise.weight")[-1] if RES in first else 3,
        dropout=(0.0,) * n,
        self_attn=True,
        timestep_conditioning_type=conds,
        switch_level=(False,) * (n - 1) if switch else None,
    )
    for preset in (STAGE_C, STAGE_C_LITE, STAGE_B, STAGE_B_LITE):
        if _weights_only(preset) == _weights_only(cfg):
            return preset
    return cfg


def _weights_only(cfg: UNetConfig) -> UNetConfig:
    """cfg with the fields that neither weights nor outputs depend on set to fixed values."""
    heads = tuple(
        h if ATTN in t else 0
        for h, t in zip(cfg.num_attention_heads, cfg.block_types_per_layer, strict=True)
    )
    return dataclasses.replace(cfg, dropout=0.0, num_attention_heads=heads)


# Released models: the "config" of the diffusers prior, prior_lite, decoder, decoder_lite folders.
_CTA = (RES, TIMESTEP, ATTN)
_CT = (RES, TIMESTEP)
STAGE_C = UNetConfig(
    in_channels=16,
    out_channels=16,
    timestep_ratio_embedding_dim=64,
    patch_size=1,
    conditioning_dim=2048,
    block_out_channels=(2048, 2048),
    num_attention_heads=(32, 32),
    down_num_layers_per_block=(8, 24),
    up_num_layers_per_block=(24, 8),
    down_blocks_repeat_mappers=(1, 1),
    up_blocks_repeat_mappers=(1, 1),
    block_types_per_layer=(_CTA, _CTA),
    clip_text_in_channels=1280,
    clip_text_pooled_in_channels=1280,
    clip_image_in_channels=768,
    clip_seq=4,
    effnet_in_channels=None,
    pixel_mapper_in_channels=None,
    kernel_size=3,
    dropout=(0.1, 0.1),
    self_attn=True,
    timestep_conditioning_type=("sca", "crp"),
    switch_level=(False,),
)
STAGE_C_LITE = dataclasses.replace(
    STAGE_C,
    conditioning_dim=1536,
    block_out_channels=(1536, 1536),
    num_attention_heads=(24, 24),
    down_num_layers_per_block=(4, 12),
    up_num_layers_per_block=(12, 4),
)
STAGE_B = UNetConfig(
    in_channels=4,
    out_channels=4,
    timestep_ratio_embedding_dim=64,
    patch_size=2,
    conditioning_dim=1280,
    block_out_channels=(320, 640, 1280, 1280),
    num_attention_heads=(0, 0, 20, 20),
    down_num_layers_per_block=(2, 6, 28, 6),
    up_num_layers_per_block=(6, 28, 6, 2),
    down_blocks_repeat_mappers=(1, 1, 1, 1),
    up_blocks_repeat_mappers=(3, 3, 2, 2),
    block_types_per_layer=(_CT, _CT, _CTA, _CTA),
    clip_text_in_channels=None,
    clip_text_pooled_in_channels=1280,
    clip_image_in_channels=None,
    clip_seq=4,
    effnet_in_channels=16,
    pixel_mapper_in_channels=3,
    kernel_size=3,
    dropout=(0, 0, 0.1, 0.1),
    self_attn=True,
    timestep_conditioning_type=("sca",),
    switch_level=None,
)
STAGE_B_LITE = dataclasses.replace(
    STAGE_B,
    block_out_channels=(320, 576, 1152, 1152),
    num_attention_heads=(0, 9, 18, 18),
    down_num_layers_per_block=(2, 4, 14, 4),
    up_num_layers_per_block=(4, 14, 4, 2),
    up_blocks_repeat_mappers=(2, 2, 2, 2),
)
