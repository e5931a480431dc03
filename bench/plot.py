"""A stacked horizontal bar chart as a PNG, drawn with Pillow (a run-time dependency already), so
plots come out on machines without matplotlib (the lent GPU machine has none)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def stacked_bars(
    path: Path,
    title: str,
    labels: Sequence[str],
    parts: Sequence[dict[str, float]],
    unit: str = "ms",
) -> Path:
    """One bar per label, split into its `parts` (same keys in every bar, drawn in that order),
    with each bar's total written at its end. Writes atomically (tmp file, then rename)."""
    keys = list(parts[0]) if parts else []
    totals = [sum(p.values()) for p in parts]
    top = max(totals, default=1.0) or 1.0
    left, bar_h, gap, width = 330, 22, 10, 1100
    height = 70 + len(labels) * (bar_h + gap) + 30
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), title, fill="black")
    x = 10
    for k, key in enumerate(keys):  # legend
        draw.rectangle([x, 30, x + 12, 42], fill=COLOURS[k % len(COLOURS)])
        draw.text((x + 16, 30), key, fill="black")
        x += 20 + 7 * len(key) + 20
    scale = (width - left - 120) / top
    for i, (label, part, total) in enumerate(zip(labels, parts, totals, strict=True)):
        y = 60 + i * (bar_h + gap)
        draw.text((10, y + 5), label[:52], fill="black")
        x0 = float(left)
        for k, key in enumerate(keys):
            x1 = x0 + part.get(key, 0.0) * scale
            if x1 > x0:
                draw.rectangle([x0, y, x1, y + bar_h], fill=COLOURS[k % len(COLOURS)])
            x0 = x1
        draw.text((x0 + 6, y + 5), f"{total:,.1f} {unit}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp)
    tmp.replace(path)
    return path
