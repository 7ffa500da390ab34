"""Draw segmentation instances on their image: translucent coloured masks, boxes and score labels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# distinct, saturated colours (tab10 without its grey), cycled over instances
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
)


def overlay(image: Image.Image, instances: Sequence[Any], alpha: float = 0.45, min_side: int = 256) -> Image.Image:
    """A copy of ``image`` with each instance's mask blended in its colour, its box outlined and
    '<query> <score>' written above it. Instances need ``mask`` [H, W] (the image's size), ``box`` xyxy
    and ``score`` (``segment.Instance``). Small images are upscaled (nearest) to ``min_side`` first so
    the labels stay readable; masks and boxes are scaled with them."""
    base = image.convert("RGB")
    scale = max(1, -(-min_side // min(base.size)))  # ceil division: an integer factor keeps pixels square
    canvas = np.asarray(base.resize((base.width * scale, base.height * scale), Image.Resampling.NEAREST),
                        dtype=np.float32)
    for k, inst in enumerate(instances):
        mask = np.asarray(inst.mask, dtype=bool)
        if mask.shape != (base.height, base.width):
            raise ValueError(f"instance {k}: mask {mask.shape} does not match the image {base.height}x{base.width}")
        mask = mask.repeat(scale, 0).repeat(scale, 1)
        colour = np.array(PALETTE[k % len(PALETTE)], np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for k, inst in enumerate(instances):
        colour = PALETTE[k % len(PALETTE)]
        x1, y1, x2, y2 = (v * scale for v in inst.box)
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=colour, width=2)
        label = f"{getattr(inst, 'query', '')} {inst.score:.2f}".strip()
        tx, ty = x1, max(0.0, y1 - 12)
        left, top, right, bottom = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((tx, ty), label, fill=(255, 255, 255), font=font)
    return out
