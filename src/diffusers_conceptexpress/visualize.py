"""Pictures people would rather look at than tensors: mask overlays and heat maps."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from .masks import as_bool_mask

__all__ = ["MASK_COLOURS", "enlarged", "heatmap", "image_grid", "overlay_masks"]

# Overlay colours (RGB) of concepts 1, 2, ..., cycled when there are more concepts.
MASK_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
)


def overlay_masks(
    image: PIL.Image.Image,
    masks: Sequence[PIL.Image.Image | np.ndarray | torch.Tensor],
    labels: Sequence[str] | None = None,
    alpha: float = 0.5,
) -> PIL.Image.Image:
    """The image with each mask tinted in its own colour and, optionally, its label at the mask's centre.

    Args:
        image: the source image (any mode; shown as RGB).
        masks: K binary masks, any size (resized to the image with nearest neighbour); each as
            :func:`~diffusers_conceptexpress.masks.as_bool_mask` accepts.
        labels: K strings (e.g. token names), or None.
        alpha: tint opacity in [0, 1].
    Returns:
        An RGB image of the source size.
    """
    base = np.asarray(image.convert("RGB")).astype(np.float32)
    out = base.copy()
    centres = []
    for k, mask in enumerate(masks):
        m = as_bool_mask(mask, image.size, resize=True, name=f"Mask {k}")
        colour = np.array(MASK_COLOURS[k % len(MASK_COLOURS)], dtype=np.float32)
        out[m] = (1 - alpha) * base[m] + alpha * colour
        ys, xs = np.nonzero(m)
        centres.append((int(xs.mean()), int(ys.mean())) if len(xs) else None)
    result = PIL.Image.fromarray(out.clip(0, 255).astype(np.uint8))
    if labels:
        draw = PIL.ImageDraw.Draw(result)
        for k, (label, centre) in enumerate(zip(labels, centres, strict=False)):
            if centre is None:
                continue
            x, y = centre
            box = draw.textbbox((x, y), label, anchor="mm")
            draw.rectangle(box, fill=MASK_COLOURS[k % len(MASK_COLOURS)])
            draw.text((x, y), label, fill=(255, 255, 255), anchor="mm")
    return result


def heatmap(values: torch.Tensor | np.ndarray, size: tuple[int, int] | None = None) -> PIL.Image.Image:
    """A 2-D map (h, w) as a min-max normalised heat image (black-red-yellow-white), optionally resized."""
    v = (
        values.detach().float().cpu().numpy()
        if isinstance(values, torch.Tensor)
        else np.asarray(values, float)
    )
    lo, hi = float(v.min()), float(v.max())
    v = (v - lo) / (hi - lo) if hi > lo else np.zeros_like(v)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    img = PIL.Image.fromarray((rgb * 255).astype(np.uint8))
    return img.resize(size, PIL.Image.Resampling.BILINEAR) if size else img


def image_grid(
    images: Sequence[PIL.Image.Image],
    captions: Sequence[str] | None = None,
    columns: int | None = None,
    min_size: int = 128,
) -> PIL.Image.Image:
    """Tile images in a grid, each with its caption (wrapped) underneath.

    Images are resized to the first one's size; small images (toy models) are enlarged with nearest
    neighbour so the smaller side is at least ``min_size`` pixels and captions stay readable.
    """
    if not images:
        raise ValueError("image_grid needs at least one image.")
    w, h = images[0].size
    scale = max(1, -(-min_size // min(w, h)))
    w, h = w * scale, h * scale
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    wrapped = [textwrap.wrap(c, width=max(8, w // 6)) or [""] for c in captions] if captions else None
    band = 11 * max(len(lines) for lines in wrapped) + 4 if wrapped else 0
    grid = PIL.Image.new("RGB", (columns * w, rows * (h + band)), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % columns) * w, (i // columns) * (h + band)
        grid.paste(img.convert("RGB").resize((w, h), PIL.Image.Resampling.NEAREST), (x, y))
        if wrapped:
            draw.multiline_text((x + 2, y + h + 2), "\n".join(wrapped[i]), fill=(0, 0, 0), spacing=1)
    return grid


def enlarged(image: PIL.Image.Image, min_size: int = 256) -> PIL.Image.Image:
    """``image`` enlarged by the smallest integer factor that makes its smaller side at least ``min_size``
    pixels, with nearest neighbour (so the pixels of a small toy image stay sharp); unchanged if already that
    large."""
    scale = -(-min_size // max(1, min(image.size)))
    if scale <= 1:
        return image
    return image.resize((image.width * scale, image.height * scale), PIL.Image.Resampling.NEAREST)
