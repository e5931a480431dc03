"""Which image sizes the cascade can make, and the latent sizes of each stage.

Stage C's latent is ceil(size / 42.67) (both recipes). Stage B's latent follows the recipe:
diffusers uses int(c * 10.67) and the official code ceil(size / 4). Stage B pixel-unshuffles its
input by 2, so its latent must be even, and Stage A decodes 4 pixels per latent. A size is valid
when the image that comes out has exactly the requested size; any other request is refused with
the nearest valid sizes instead of silently returning a different size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RESOLUTION_MULTIPLE = 42.67  # image pixels per Stage C latent cell
LATENT_DIM_SCALE = 10.67  # Stage B latent cells per Stage C cell (diffusers)
STAGE_A_SCALE = 4  # image pixels per Stage B latent cell
MIN_SIZE = 128
MAX_SIZE = 8192


@dataclass(frozen=True)
class LatentSizes:
    stage_c: tuple[int, int]  # (h, w) of the 16-channel Stage C latent
    stage_b: tuple[int, int]  # (h, w) of the 4-channel Stage B latent
    image: tuple[int, int]  # (h, w) in pixels


def _stage_c_side(size: int) -> int:
    return math.ceil(size / RESOLUTION_MULTIPLE)


def _stage_b_side(size: int, recipe: str) -> int:
    if recipe == "stability":
        return math.ceil(size / STAGE_A_SCALE)
    return int(_stage_c_side(size) * LATENT_DIM_SCALE)


def is_valid_side(size: int, recipe: str = "diffusers") -> bool:
    b = _stage_b_side(size, recipe)
    return b % 2 == 0 and b * STAGE_A_SCALE == size


def nearest_valid_sides(size: int, recipe: str = "diffusers") -> tuple[int, int]:
    """The largest valid side below `size` and the smallest above it (within the limits)."""
    below = next((s for s in range(size - 1, MIN_SIZE - 1, -1) if is_valid_side(s, recipe)), None)
    above = next((s for s in range(size + 1, MAX_SIZE + 1) if is_valid_side(s, recipe)), None)
    return (below or above or MIN_SIZE, above or below or MAX_SIZE)


def latent_sizes(height: int, width: int, recipe: str = "diffusers") -> LatentSizes:
    """Latent sizes for an image, or a ValueError naming the rule and the nearest valid sizes."""
    for name, size in (("height", height), ("width", width)):
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"{name} must be an int, got {type(size).__name__}")
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(
                f"{name}={size} is outside the supported range [{MIN_SIZE}, {MAX_SIZE}]"
            )
        if not is_valid_side(size, recipe):
            below, above = nearest_valid_sides(size, recipe)
            c = _stage_c_side(size)
            b = _stage_b_side(size, recipe)
            raise ValueError(
                f"{name}={size} cannot be made by the cascade ({recipe} recipe): Stage C latent "
                f"ceil({size}/42.67)={c}, Stage B latent {b} -> a {b * STAGE_A_SCALE}-pixel image"
                f"{' (Stage B needs an even latent)' if b % 2 else ''}. Nearest valid {name}s: "
                f"{below} and {above}; every multiple of 128 works."
            )
    return LatentSizes(
        stage_c=(_stage_c_side(height), _stage_c_side(width)),
        stage_b=(_stage_b_side(height, recipe), _stage_b_side(width, recipe)),
        image=(height, width),
    )
