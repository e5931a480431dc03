"""Public ops: validate, allocate `out` when none is given, dispatch through the registry."""

from cascade_rt.ops.attention import attention
from cascade_rt.ops.grn_gelu import fold_grn_bias, grn_folded_linear, grn_gelu, grn_gelu_folded
from cascade_rt.ops.groupnorm_silu import groupnorm_silu
from cascade_rt.ops.layernorm2d import layernorm2d
from cascade_rt.ops.vq_lookup import vq_lookup

__all__ = [
    "attention",
    "fold_grn_bias",
    "grn_folded_linear",
    "grn_gelu",
    "grn_gelu_folded",
    "groupnorm_silu",
    "layernorm2d",
    "vq_lookup",
]
