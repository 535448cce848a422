"""User-given masks (e.g. from SAM or drawn by hand) to concept masks on the latent grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

__all__ = ["masks_to_latent_grid"]


def _to_array(mask, index: int) -> np.ndarray:
    if isinstance(mask, PIL.Image.Image):
        return np.asarray(mask.convert("L")) > 127
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise ValueError(f"Mask {index} must be 2-D (height, width), got shape {mask.shape}.")
        return mask > (127 if mask.dtype == np.uint8 else 0.5)
    raise TypeError(f"Mask {index} has type {type(mask).__name__}; use PIL images, numpy arrays or tensors.")


def masks_to_latent_grid(
    masks: Sequence, image_size: tuple[int, int], latent_size: tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """Binary masks at the image size -> (K, h, w) bool masks on the latent grid (area-averaged, > threshold).

    Args:
        masks: K masks of size ``image_size`` (width, height); PIL, numpy (H, W) or torch (H, W).
        image_size: (width, height) of the source image.
        latent_size: (h, w) of the latent grid.
    Raises:
        ValueError: no mask, a mask of the wrong size, or a mask too small to cover any latent cell (say which).
    """
    if isinstance(masks, (PIL.Image.Image, np.ndarray, torch.Tensor)) and not (
        isinstance(masks, (np.ndarray, torch.Tensor)) and masks.ndim == 3
    ):
        masks = [masks]
    masks = list(masks)
    if not masks:
        raise ValueError("masks= is an empty list; pass at least one mask or leave masks=None.")
    arrays = []
    for i, mask in enumerate(masks):
        a = _to_array(mask, i)
        if (a.shape[1], a.shape[0]) != tuple(image_size):
            raise ValueError(
                f"Mask {i} is {a.shape[1]}x{a.shape[0]} but the image is {image_size[0]}x{image_size[1]}; "
                "masks must have the image's size."
            )
        arrays.append(torch.from_numpy(a.astype(np.float32)))
    stacked = torch.stack(arrays)[:, None]
    pooled = F.interpolate(stacked, size=latent_size, mode="area")[:, 0]
    out = pooled > threshold
    empty = [i for i in range(out.shape[0]) if not bool(out[i].any())]
    for i in empty:  # tiny masks: keep their best cell rather than nothing
        if float(pooled[i].max()) <= 0:
            raise ValueError(f"Mask {i} is empty.")
        out[i].view(-1)[int(pooled[i].argmax())] = True
    return out
