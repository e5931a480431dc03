"""Public ops: validate, allocate `out` when none is given, dispatch through the registry."""

from cascade_rt.ops.attention import attention
from cascade_rt.ops.grn_gelu import grn_gelu
from cascade_rt.ops.layernorm2d import layernorm2d
from cascade_rt.ops.vq_lookup import vq_lookup

__all__ = ["attention", "grn_gelu", "layernorm2d", "vq_lookup"]
