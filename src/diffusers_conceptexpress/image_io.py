# Copyright 2024 The diffusers-conceptexpress contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Image input handling shared by every entry point of the concept-extraction pipeline.

Every public entry point (pipeline call, CLI, benchmarks) goes through :func:`load_image` /
:func:`prepare_image`, so that all of them accept the same inputs, reject bad inputs with the same
actionable messages, and resize images the same way.

Conventions used throughout this module:

* PIL sizes are ``(width, height)`` in pixels; arrays and tensors are ``(H, W[, C])`` / ``(C, H, W)``.
* Images fed to the model are float32 tensors of shape ``(1, 3, H, W)`` with values in ``[-1, 1]``.
* Masks returned to the user are mode ``"L"`` PIL images with values ``0`` or ``255``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "MIN_IMAGE_SIZE",
    "RESIZE_POLICIES",
    "ImageInput",
    "ImageInputError",
    "ResizeRecord",
    "compute_model_size",
    "load_and_prepare_image",
    "load_image",
    "mask_to_original",
    "prepare_image",
]

#: Smallest accepted width and height, in pixels, of an input image (after EXIF orientation).
MIN_IMAGE_SIZE: int = 64

#: Names accepted by the ``policy`` argument of :func:`compute_model_size` / :func:`prepare_image`.
RESIZE_POLICIES: tuple[str, ...] = ("squash", "keep_aspect")

#: Everything :func:`load_image` accepts: a file path, a PIL image, a numpy array or a torch tensor.
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]  # noqa: UP007

_ACCEPTED_TYPES = "str, os.PathLike (e.g. pathlib.Path), PIL.Image.Image, numpy.ndarray, torch.Tensor"
_ARRAY_SHAPES = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
_TENSOR_SHAPES = "(C, H, W) or (1, C, H, W) with C in {1, 3, 4}"
# Tolerance on the [0, 1] range of float inputs (absorbs rounding noise of upstream processing).
_FLOAT_RANGE_TOL = 1e-3
_WHITE = (255, 255, 255)


class ImageInputError(ValueError):
    """Raised when an image input has the right type but unusable content.

    Examples: a file that is not a readable image, an array with an unsupported shape or value range,
    or an image smaller than :data:`MIN_IMAGE_SIZE` pixels on a side.
    """


@dataclass(frozen=True)
class ResizeRecord:
    """How an input image was resized before being fed to the model.

    Attributes:
        original_size: ``(width, height)`` in pixels of the loaded image (after EXIF orientation).
        model_size: ``(width, height)`` in pixels of the image actually fed to the model.
        policy: The resize policy used, one of :data:`RESIZE_POLICIES`.
    """

    original_size: tuple[int, int]
    model_size: tuple[int, int]
    policy: str


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def load_image(image: ImageInput) -> Image.Image:
    """Load and validate an image, returning it as an RGB PIL image.

    Args:
        image: One of

            * a path (``str`` or ``os.PathLike``) to an image file readable by PIL;
            * a ``PIL.Image.Image`` in any mode;
            * a ``numpy.ndarray`` of shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``
              (channels last) with dtype ``uint8`` (values ``0..255``), float (values in ``[0, 1]``)
              or ``bool`` (``False`` -> black, ``True`` -> white). Other integer dtypes are accepted
              when all values lie in ``0..255``;
            * a ``torch.Tensor`` of shape ``(C, H, W)`` or ``(1, C, H, W)`` with ``C`` in ``{1, 3, 4}``
              (channels first), float in ``[0, 1]`` or ``uint8``.

            One channel is grayscale, three are RGB, four are RGBA.

    Returns:
        A mode ``"RGB"`` PIL image of size ``(width, height)``, both at least :data:`MIN_IMAGE_SIZE`.
        The EXIF orientation of PIL inputs (files included) is applied, transparent pixels are
        composited onto a white background, and only the first frame of multi-frame files is kept.
        A new image is always returned; a PIL input is not modified.

    Raises:
        FileNotFoundError: If a path does not exist.
        ImageInputError: If the content cannot be used (unreadable file, directory, bad shape,
            dtype or value range, too small).
        TypeError: If ``image`` is of none of the accepted types.
    """
    if isinstance(image, (str, os.PathLike)):
        rgb = _load_path(image)
    elif isinstance(image, Image.Image):
        rgb = _pil_to_rgb(image, source="PIL image")
    elif isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image, source="numpy array")
    elif isinstance(image, torch.Tensor):
        rgb = _tensor_to_rgb(image)
    else:
        raise TypeError(
            f"Unsupported image type {type(image).__qualname__!r}; expected one of: {_ACCEPTED_TYPES}."
        )

    width, height = rgb.size
    if width < MIN_IMAGE_SIZE or height < MIN_IMAGE_SIZE:
        raise ImageInputError(
            f"Image is too small: {width}x{height} (width x height) pixels; at least "
            f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} is needed."
        )
    return rgb


def _load_path(image: str | os.PathLike) -> Image.Image:
    """Open an image file and convert it to RGB (see :func:`load_image`)."""
    path = Path(os.fsdecode(os.fspath(image)))
    if not path.exists():
        raise FileNotFoundError(
            f"Image file not found: '{path}'. Check that the path is correct and the file exists."
        )
    if path.is_dir():
        raise ImageInputError(f"'{path}' is a directory, not an image file.")

    img: Image.Image | None = None
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if img is not None:
            img.close()
        if isinstance(exc, PermissionError):
            raise
        raise ImageInputError(
            f"'{path}' is not a readable image file ({type(exc).__name__}: {exc})."
        ) from exc
    with img:
        return _pil_to_rgb(img, source=f"image file '{path}'")


def _pil_to_rgb(img: Image.Image, *, source: str) -> Image.Image:
    """Convert a PIL image in any mode to a new RGB image.

    Keeps the first frame of multi-frame images, applies the EXIF orientation, composites transparent
    pixels onto white and rescales high-bit-depth grayscale to 8 bit. The input is left unchanged
    (its current frame is restored if it had to be changed).
    """
    n_frames = getattr(img, "n_frames", 1)
    current_frame = img.tell() if n_frames > 1 else 0
    try:
        if current_frame != 0:
            img.seek(0)
        try:
            frame = ImageOps.exif_transpose(img)  # always a new image
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageInputError(
                f"Could not read the pixels of the {source} ({type(exc).__name__}: {exc})."
            ) from exc
    finally:
        if current_frame != 0:
            img.seek(current_frame)

    mode = frame.mode
    if mode == "RGB":
        return frame
    if mode.startswith("I") or mode == "F":  # "I", "I;16", "I;16B", "I;16L", "I;16N", "F"
        return _high_bit_depth_to_rgb(frame)
    if mode == "La":  # premultiplied alpha; Pillow converts La -> LA only
        frame = frame.convert("LA")
        mode = "LA"
    has_alpha = mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in frame.info
    try:
        if has_alpha:
            return _composite_on_white(frame.convert("RGBA"))
        return frame.convert("RGB")
    except ValueError as exc:  # e.g. "LAB" without a colour profile
        raise ImageInputError(f"Cannot convert the {source} from PIL mode {mode!r} to RGB: {exc}") from exc


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Convert an ``"I;16*"``, ``"I"`` or ``"F"`` grayscale image to RGB without clipping.

    ``"I;16*"`` maps ``0..65535`` linearly onto ``0..255``. ``"I"`` (int32) and ``"F"`` (float32) are kept
    as is when their maximum is at most 255 and otherwise divided by their own maximum (``max -> 255``);
    negative values are clipped to 0 and NaNs become 0. A single integer ``"transparency"`` value is
    honoured (such pixels become white).
    """
    values = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        scaled = values * (255.0 / 65535.0)
    else:
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        peak = float(values.max()) if values.size else 0.0
        scaled = values * (255.0 / peak) if peak > 255.0 else values
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    transparency = img.info.get("transparency")
    if isinstance(transparency, int):
        rgb[np.asarray(img) == transparency] = _WHITE
    return Image.fromarray(rgb)


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """Alpha-composite an RGBA image onto an opaque white background; returns an RGB image."""
    background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _array_to_rgb(array: np.ndarray, *, source: str) -> Image.Image:
    """Convert a channels-last ``(H, W[, C])`` numpy array to an RGB PIL image (see :func:`load_image`)."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        hint = ""
        if array.ndim == 3 and array.shape[0] in (1, 3, 4):
            hint = " Arrays are channels-last; for a (C, H, W) array pass array.transpose(1, 2, 0)."
        raise ImageInputError(
            f"Unsupported {source} shape {tuple(array.shape)}; accepted shapes are {_ARRAY_SHAPES}.{hint}"
        )
    if array.size == 0:
        raise ImageInputError(f"The {source} is empty (shape {tuple(array.shape)}).")

    pixels = np.ascontiguousarray(_to_uint8(array, source=source))
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        return _composite_on_white(Image.fromarray(pixels))  # RGBA
    return Image.fromarray(pixels).convert("RGB")  # L or RGB


def _to_uint8(array: np.ndarray, *, source: str) -> np.ndarray:
    """Map an array of any accepted dtype onto ``uint8`` values ``0..255`` (same shape)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageInputError(
                f"Integer {source} (dtype {array.dtype}) has values in [{low}, {high}], but integer images "
                "must be in 0..255. Convert to uint8, or to float in [0, 1]."
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageInputError(f"The {source} contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < -_FLOAT_RANGE_TOL or high > 1.0 + _FLOAT_RANGE_TOL:
            raise ImageInputError(
                f"Float {source} has values in [{low:.4g}, {high:.4g}], but float images must be in [0, 1]. "
                "For data in [-1, 1] pass (x + 1) / 2; for data in [0, 255] pass x / 255."
            )
        return np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ImageInputError(
        f"Unsupported {source} dtype {array.dtype}; expected uint8, float in [0, 1] or bool."
    )


def _tensor_to_rgb(tensor: torch.Tensor) -> Image.Image:
    """Convert a channels-first ``(C, H, W)`` or ``(1, C, H, W)`` tensor to an RGB PIL image."""
    shape = tuple(tensor.shape)
    if tensor.ndim == 4:
        if shape[0] != 1:
            raise ImageInputError(
                f"Got a batch of {shape[0]} images (tensor shape {shape}); pass one image at a time, "
                "e.g. tensor[0] or a tensor of shape (1, C, H, W)."
            )
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ImageInputError(
            f"Unsupported torch.Tensor shape {shape}; accepted shapes are {_TENSOR_SHAPES}."
        )

    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():  # float16 / bfloat16 / float64 -> float32 (numpy has no bfloat16)
        tensor = tensor.float()
    array = tensor.permute(1, 2, 0).numpy()  # (H, W, C)
    return _array_to_rgb(array, source="torch.Tensor")


# ----------------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------------


def _check_resize_args(resolution: int, multiple: int, policy: str) -> None:
    if policy not in RESIZE_POLICIES:
        raise ValueError(f"Unknown resize policy {policy!r}; expected one of {RESIZE_POLICIES}.")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple <= 0:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}.")
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, int)
        or resolution <= 0
        or resolution % multiple
    ):
        raise ValueError(f"resolution must be a positive multiple of {multiple}, got {resolution!r}.")


def compute_model_size(
    original_size: tuple[int, int], resolution: int, multiple: int, policy: str
) -> tuple[int, int]:
    """Size ``(width, height)`` in pixels at which an image is fed to the model.

    Args:
        original_size: ``(width, height)`` in pixels of the loaded image.
        resolution: Target side length in pixels, e.g. 512 for Stable Diffusion 1.x/2.x-base. Must be a
            positive multiple of ``multiple``.
        multiple: Every side of the result is a multiple of this (8 for the SD VAE, whose latent grid
            is the image size divided by 8).
        policy: ``"squash"`` returns ``(resolution, resolution)`` whatever the aspect ratio (the
            behaviour of the ConceptExpress authors' code). ``"keep_aspect"`` keeps the aspect ratio
            with an area of about ``resolution ** 2``: the shorter side is rounded to the nearest
            multiple of ``multiple`` (at least ``multiple``), and the longer side is derived from the
            rounded shorter side and the aspect ratio, again rounded to the nearest multiple. Square
            inputs give ``(resolution, resolution)``. For extreme aspect ratios, where the shorter side
            is close to ``multiple``, the area may be noticeably larger or smaller than ``resolution ** 2``.

    Returns:
        ``(width, height)`` in pixels, both positive multiples of ``multiple``.

    Raises:
        ValueError: If ``policy`` is not in :data:`RESIZE_POLICIES`, ``resolution`` is not a positive
            multiple of ``multiple``, or ``original_size`` is not two positive integers.
    """
    _check_resize_args(resolution, multiple, policy)
    if len(original_size) != 2 or any(int(side) != side or side <= 0 for side in original_size):
        raise ValueError(
            f"original_size must be (width, height) with positive integers, got {original_size!r}."
        )
    if policy == "squash":
        return (resolution, resolution)

    width, height = int(original_size[0]), int(original_size[1])
    short, long = min(width, height), max(width, height)

    def snap(length: float) -> int:
        return max(multiple, math.floor(length / multiple + 0.5) * multiple)

    new_short = snap(resolution * math.sqrt(short / long))
    new_long = snap(new_short * long / short)
    return (new_long, new_short) if width >= height else (new_short, new_long)


def prepare_image(
    image: ImageInput, resolution: int, *, multiple: int = 8, policy: str = "squash"
) -> tuple[torch.Tensor, ResizeRecord]:
    """Load, validate and resize an image into a Stable Diffusion input tensor.

    Args:
        image: Any input accepted by :func:`load_image`.
        resolution: Target side length in pixels (see :func:`compute_model_size`).
        multiple: Every side of the model input is a multiple of this (8 for the SD VAE).
        policy: One of :data:`RESIZE_POLICIES` (see :func:`compute_model_size`).

    Returns:
        ``(pixels, record)``: ``pixels`` is a float32 CPU tensor of shape ``(1, 3, H, W)`` with values in
        ``[-1, 1]``, where ``(W, H) == record.model_size``; the image is resized with PIL bicubic
        resampling. ``record`` is the :class:`ResizeRecord` needed to map results back to the original
        image with :func:`mask_to_original`.

    Raises:
        ValueError: For invalid ``resolution`` / ``multiple`` / ``policy`` (checked before loading).
        FileNotFoundError, ImageInputError, TypeError: See :func:`load_image`.
    """
    _, pixels, record = load_and_prepare_image(image, resolution, multiple=multiple, policy=policy)
    return pixels, record


def load_and_prepare_image(
    image: ImageInput, resolution: int, *, multiple: int = 8, policy: str = "squash"
) -> tuple[Image.Image, torch.Tensor, ResizeRecord]:
    """:func:`prepare_image` that also returns the loaded image: ``(rgb, pixels, record)``.

    ``rgb`` is what :func:`load_image` returns (RGB, original size), so a caller that needs both the image
    and the model input decodes the input once. Arguments and errors are those of :func:`prepare_image`.
    """
    _check_resize_args(resolution, multiple, policy)
    rgb = load_image(image)
    original_size = rgb.size
    model_size = compute_model_size(original_size, resolution, multiple, policy)
    resized = (
        rgb.resize(model_size, resample=Image.Resampling.BICUBIC) if original_size != model_size else rgb
    )
    array = np.asarray(resized, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    pixels = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()
    record = ResizeRecord(original_size=original_size, model_size=model_size, policy=policy)
    return rgb, pixels, record


# ----------------------------------------------------------------------------------------------------
# Mapping results back
# ----------------------------------------------------------------------------------------------------


def mask_to_original(mask: torch.Tensor | np.ndarray, record: ResizeRecord) -> Image.Image:
    """Map a binary mask on any grid back to the original image size.

    Args:
        mask: 2-D ``(h, w)`` torch tensor or numpy array on any grid (e.g. the 64x64 latent grid of a
            512x512 model input, or a non-square ``h x w`` grid), either ``bool`` or numeric with
            values in ``[0, 1]`` (numeric values ``>= 0.5`` count as foreground).
        record: The :class:`ResizeRecord` returned by :func:`prepare_image` for that image.

    Returns:
        A mode ``"L"`` PIL image of size ``record.original_size`` (width, height) with values ``0``
        (background) or ``255`` (foreground), resized with nearest-neighbour resampling.

    Raises:
        TypeError: If ``mask`` is neither a torch tensor nor a numpy array.
        ValueError: If ``mask`` is not 2-D, is empty, or has values outside ``[0, 1]``.
    """
    if isinstance(mask, torch.Tensor):
        tensor = mask.detach().cpu()
        array = (tensor.float() if tensor.is_floating_point() else tensor).numpy()
    elif isinstance(mask, np.ndarray):
        array = mask
    else:
        raise TypeError(f"mask must be a torch.Tensor or numpy.ndarray, got {type(mask).__qualname__!r}.")
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"mask must be a non-empty 2-D (h, w) array, got shape {tuple(array.shape)}.")

    if array.dtype == np.bool_:
        binary = array
    elif np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"mask values must be bool or in [0, 1], got values in [{array.min()}, {array.max()}]."
            )
        binary = array >= 0.5
    else:
        raise ValueError(f"Unsupported mask dtype {array.dtype}; expected bool, integer or float.")

    small = Image.fromarray(np.ascontiguousarray(binary, dtype=np.uint8) * 255)  # mode "L", (w, h)
    return small.resize(record.original_size, resample=Image.Resampling.NEAREST)
