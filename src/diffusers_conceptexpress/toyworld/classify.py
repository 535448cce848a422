"""Shape, colour and texture of the main object of toy-world images, by a small shipped CNN.

The classifier (about 60k parameters, fp16 safetensors under ``model/classifier/``) is trained on fresh
single-object renders with blur, noise and colour-jitter augmentation so that it also reads the (softer)
pictures the toy diffusion model generates. Striped objects are rendered with their dark bands at one of
``stripe_shades`` (shares of the colour; each training render draws one), so one classifier reads the worlds
that differ only in those bands (0.55, the third world's, and 0.8, the fourth world's lighter stripes, the
default since session 14). This module only reads it; the training lives in the repository's ``research/``
folder. Reproduce it, from the repository root, with::

    python -m research.toyworld_training.classifier --train --steps 1500 --threads 1 --stripe-shades 0.55,0.8
"""

from __future__ import annotations

import itertools
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .scenes import COLORS, IMAGE_SIZE, SHAPES, TEXTURES

__all__ = [
    "ToyClassifier",
    "classifier_path",
    "classify",
    "load_classifier",
]


def classifier_path() -> Path:
    return Path(__file__).resolve().parent / "model" / "classifier"


class ToyClassifier(nn.Module):
    """CNN with three heads: shape (6), colour (8), texture (2)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        ch = [width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        for a, b in itertools.pairwise(ch):  # 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {
                "shape": nn.Linear(2 * ch[-1], len(SHAPES)),
                "color": nn.Linear(2 * ch[-1], len(COLORS)),
                "texture": nn.Linear(2 * ch[-1], len(TEXTURES)),
            }
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return {k: head(h) for k, head in self.heads.items()}


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)) for im in images]
    x = torch.from_numpy(np.stack(arr).astype(np.float32) / 127.5 - 1.0)
    return x.permute(0, 3, 1, 2).contiguous()


@lru_cache(maxsize=4)
def load_classifier(path: str | Path | None = None) -> ToyClassifier:
    """The classifier saved in ``path`` (a folder with ``config.json`` and ``model.safetensors``; default the
    shipped one, ``classifier_path()``), in eval mode; cached per path."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else classifier_path()
    config = json.loads((path / "config.json").read_text())
    model = ToyClassifier(width=config["width"])
    state = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def classify(images: list[Image.Image], path: str | Path | None = None) -> list[dict]:
    """Shape, colour and texture of the main (largest) object of each image.

    ``path``: another classifier folder (``load_classifier``); default the shipped one.

    Returns:
        one dict per image: {"shape", "color", "texture", "confidence"} (confidence = product of the three
        top softmax probabilities).
    """
    if not images:
        return []
    model = load_classifier(path)
    out = []
    for start in range(0, len(images), 256):
        logits = model(_to_tensor(list(images[start : start + 256])))
        probs = {k: v.softmax(-1) for k, v in logits.items()}
        for i in range(next(iter(probs.values())).shape[0]):
            p_s, s = probs["shape"][i].max(0)
            p_c, c = probs["color"][i].max(0)
            p_t, t = probs["texture"][i].max(0)
            out.append(
                {
                    "shape": SHAPES[int(s)],
                    "color": COLORS[int(c)],
                    "texture": TEXTURES[int(t)],
                    "confidence": float(p_s * p_c * p_t),
                }
            )
    return out
