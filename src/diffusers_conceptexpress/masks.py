"""Binary masks: the one converter every module uses (:func:`as_bool_mask`), and user-given masks (e.g. from
SAM or drawn by hand) to concept masks on the latent grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

__all__ = ["as_bool_mask", "masks_to_latent_grid"]


def as_bool_mask(
    mask: PIL.Image.Image | np.ndarray | torch.Tensor,
    size: tuple[int, int] | None = None,
    *,
    resize: bool = False,
    name: str = "Mask",
) -> np.ndarray:
    """One binary mask as a boolean numpy array of shape (H, W).

    Accepted inputs:

    - a PIL image of any mode, converted to "L": inside where > 127 (so "1" masks and 0/255 "L" masks);
    - a numpy array or a torch tensor (any device and dtype; it is detached) of shape (H, W) or (H, W, 1):
      bool as is; uint8 is read like an 8-bit image, inside where > 127 (a 0/1 uint8 array is empty: pass
      it as bool); any other number is inside where > 0.5 (0/1 floats or integers).

    Args:
        mask: the mask.
        size: the expected (width, height), or None for any size.
        resize: with ``size``, a mask of another size is resized to it (nearest neighbour) instead of refused.
        name: how error messages name the mask, e.g. "Mask 2".
    Raises:
        TypeError: ``mask`` is none of the accepted types.
        ValueError: the mask is not 2-D, or (without ``resize``) not of ``size``.
    """
    if isinstance(mask, PIL.Image.Image):
        out = np.asarray(mask.convert("L")) > 127
    elif isinstance(mask, (np.ndarray, torch.Tensor)):
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu()
            mask = (mask.float() if mask.dtype == torch.bfloat16 else mask).numpy()
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise ValueError(f"{name} must be 2-D (height, width), got shape {mask.shape}.")
        out = mask.copy() if mask.dtype == np.bool_ else mask > (127 if mask.dtype == np.uint8 else 0.5)
    else:
        raise TypeError(f"{name} has type {type(mask).__name__}; use PIL images, numpy arrays or tensors.")
    if size is not None and (out.shape[1], out.shape[0]) != tuple(size):
        if not resize:
            raise ValueError(
                f"{name} is {out.shape[1]}x{out.shape[0]} but the image is {size[0]}x{size[1]}; "
                "masks must have the image's size."
            )
        small = PIL.Image.fromarray(out.astype(np.uint8) * 255)
        out = np.asarray(small.resize(tuple(size), PIL.Image.Resampling.NEAREST)) > 127
    return out


def masks_to_latent_grid(
    masks: Sequence, image_size: tuple[int, int], latent_size: tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """Binary masks at the image size -> (K, h, w) bool masks on the latent grid (area-averaged, > threshold).

    Args:
        masks: K masks of size ``image_size`` (width, height), each as :func:`as_bool_mask` accepts; a single
            mask, or a (K, H, W) numpy array or tensor, is accepted too.
        image_size: (width, height) of the source image.
        latent_size: (h, w) of the latent grid.
    Raises:
        ValueError: no mask, a mask of the wrong size, or an empty mask (the message says which).
    """
    if isinstance(masks, (PIL.Image.Image, np.ndarray, torch.Tensor)) and not (
        isinstance(masks, (np.ndarray, torch.Tensor)) and masks.ndim == 3
    ):
        masks = [masks]
    masks = list(masks)
    if not masks:
        raise ValueError("masks= is an empty list; pass at least one mask or leave masks=None.")
    arrays = [
        torch.from_numpy(as_bool_mask(mask, image_size, name=f"Mask {i}").astype(np.float32))
        for i, mask in enumerate(masks)
    ]
    stacked = torch.stack(arrays)[:, None]
    pooled = F.interpolate(stacked, size=latent_size, mode="area")[:, 0]
    out = pooled > threshold
    empty = [i for i in range(out.shape[0]) if not bool(out[i].any())]
    for i in empty:  # tiny masks: keep their best cell rather than nothing
        if float(pooled[i].max()) <= 0:
            raise ValueError(f"Mask {i} is empty.")
        out[i].view(-1)[int(pooled[i].argmax())] = True
    return out


def on_grid(
    masks: torch.Tensor, features: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept masks (K, h, w) bool and soft maps (K, h, w) moved to another grid ``size`` (nearest neighbour;
    each map renormalised to sum 1). Unchanged (the same tensors) when already on it.

    SDXL localizes on its finest attention grid, half the latent grid; learning needs the latent grid.
    """
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks, features
    up_masks = F.interpolate(masks[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0.5
    up = F.interpolate(features[:, None].float(), size=tuple(size), mode="nearest")[:, 0]
    return up_masks, up / up.sum((1, 2), keepdim=True).clamp_min(1e-30)
