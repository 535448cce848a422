"""Toy world: procedural scenes with exact ground truth and a small Stable-Diffusion-shaped model trained on them.

- :func:`render_scene` draws scene number ``seed`` (64x64 RGB, 1-3 objects, masks, caption).
- :func:`model_path` is the folder of the shipped diffusers pipeline (VAE, CLIP text encoder, tokenizer,
  UNet, DDIM scheduler), loadable offline by ``ConceptExpressPipeline`` and ``StableDiffusionPipeline``.
- :func:`classify` reads the shape, colour and texture of the main object of images.

The model card is ``docs/toyworld.md``; the training recipe is ``python -m diffusers_conceptexpress.toyworld.train``.
"""

from __future__ import annotations

from pathlib import Path

from .classify import classify
from .scenes import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    TEXTURES,
    WORLD_VERSION,
    Scene,
    caption_for,
    object_phrase,
    render_scene,
    shape_mask,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "IMAGE_SIZE",
    "PALETTE",
    "SHAPES",
    "TEXTURES",
    "WORDS",
    "WORLD_VERSION",
    "Scene",
    "caption_for",
    "classify",
    "model_path",
    "object_phrase",
    "render_scene",
    "shape_mask",
]

#: every word of the toy vocabulary; the shipped tokenizer maps each to ONE token id
WORDS = ("a", "photo", "of", "and", *SHAPES, *COLORS, *(t for t in TEXTURES if t != "plain"))


def model_path() -> str:
    """Local folder of the shipped toy pipeline (pass it to ``from_pretrained``; nothing is downloaded)."""
    path = Path(__file__).resolve().parent / "model"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The toy-world model is missing from {path}; rebuild it with "
            "`python -m diffusers_conceptexpress.toyworld.train --out " + str(path) + "`."
        )
    return str(path)
