"""Toy world: procedural scenes with exact ground truth and a small Stable-Diffusion-shaped model trained on them.

- :func:`render_scene` draws scene number ``seed`` (64x64 RGB, 1-3 objects, masks, caption).
- :func:`model_path` is the folder of the shipped diffusers pipeline (VAE, CLIP text encoder, tokenizer,
  UNet, DDIM scheduler), loadable offline by ``ConceptExpressPipeline`` and ``StableDiffusionPipeline``.
- :func:`classify` reads the shape, colour and texture of the main object of images.
- :func:`build_tokenizer` writes the toy tokenizer (every word of :data:`WORDS` one token).

The model card is ``docs/toyworld.md``. This package holds inference only; the training code lives outside it,
in the repository's ``research/`` folder: ``python -m research.toyworld_training`` (the model) and
``python -m research.toyworld_training.classifier --train`` (the classifier), run from the repository root.
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
from .tokenizer import WORDS, build_tokenizer

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "GENERATION_STEPS",
    "GUIDANCE_SCALE",
    "IMAGE_SIZE",
    "PALETTE",
    "SHAPES",
    "TEXTURES",
    "WORDS",
    "WORLD_VERSION",
    "Scene",
    "build_tokenizer",
    "caption_for",
    "classify",
    "model_path",
    "object_phrase",
    "render_scene",
    "shape_mask",
]

#: Sampling settings the toy model is evaluated and shown with (docs/toyworld.md): DDIM steps, guidance scale
#: (7.5, the SD default, over-saturates it; 1 loses the shape).
GENERATION_STEPS = 25
GUIDANCE_SCALE = 5.0


def model_path() -> str:
    """Local folder of the shipped toy pipeline (pass it to ``from_pretrained``; nothing is downloaded)."""
    path = Path(__file__).resolve().parent / "model"
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The toy-world model is missing from {path}; rebuild it from a checkout of the repository with "
            "`python -m research.toyworld_training --out " + str(path) + "` (research/README.md)."
        )
    return str(path)
