"""cascade_rt: fast, lean inference for the Stable Cascade text-to-image cascade.

from cascade_rt import Cascade
pipe = Cascade.from_pretrained("path/to/checkpoints")
image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Cascade", "CascadeOutput", "__version__"]

if TYPE_CHECKING:
    from cascade_rt.pipeline import Cascade, CascadeOutput


def __getattr__(name: str):
    # Lazy, so `import cascade_rt` (and `cascade-rt info`) stays light.
    if name in ("Cascade", "CascadeOutput"):
        from cascade_rt import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'cascade_rt' has no attribute {name!r}")
