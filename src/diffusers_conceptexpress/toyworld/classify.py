"""Shape, colour and texture of the main object of toy-world images, by a small shipped CNN.

The classifier (about 60k parameters, fp16 safetensors under ``model/classifier/``) is trained on fresh
single-object renders with blur, noise and colour-jitter augmentation so that it also reads the (softer)
pictures the toy diffusion model generates. Striped objects are rendered with their dark bands at one of
``stripe_shades`` (shares of the colour; each training render draws one), so one classifier reads the worlds
that differ only in those bands (0.55, the third world's, and 0.8, the fourth world's lighter stripes, the default since session 14).
Reproduce it with::

    python -m diffusers_conceptexpress.toyworld.classify --train --steps 1500 --threads 1 --stripe-shades 0.55,0.8
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .scenes import COLORS, IMAGE_SIZE, SHAPES, STRIPE_SHADE, TEXTURES, render_scene

__all__ = [
    "ToyClassifier",
    "classifier_path",
    "classify",
    "load_classifier",
    "render_accuracy",
    "train_classifier",
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


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    # random blur (generated pictures are softer than renders)
    sigma = torch.rand(b, generator=g) * 1.2
    k = torch.arange(-3, 4, dtype=torch.float32)
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None].clamp_min(0.05) ** 2))
    kern = kern / kern.sum(1, keepdim=True)  # (b, 7)
    xb = x.reshape(1, b * 3, IMAGE_SIZE, IMAGE_SIZE)
    kx = kern.repeat_interleave(3, 0)[:, None, None, :]
    ky = kern.repeat_interleave(3, 0)[:, None, :, None]
    xb = F.conv2d(F.pad(xb, (3, 3, 0, 0), mode="replicate"), kx, groups=b * 3)
    xb = F.conv2d(F.pad(xb, (0, 0, 3, 3), mode="replicate"), ky, groups=b * 3)
    x = xb.reshape(b, 3, IMAGE_SIZE, IMAGE_SIZE)
    # brightness / contrast / per-channel jitter and pixel noise
    x = x * (1 + 0.15 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5))
    x = x + 0.08 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    x = x + 0.05 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.clamp(-1, 1)


def _batch(seeds, shades=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    shades = [STRIPE_SHADE] * len(seeds) if shades is None else shades
    scenes = [
        render_scene(int(s), num_objects=1, stripe_shade=float(h)) for s, h in zip(seeds, shades, strict=True)
    ]
    x = _to_tensor([s.image for s in scenes])
    y = {
        "shape": torch.tensor([SHAPES.index(s.objects[0]["shape"]) for s in scenes]),
        "color": torch.tensor([COLORS.index(s.objects[0]["color"]) for s in scenes]),
        "texture": torch.tensor([TEXTURES.index(s.objects[0]["texture"]) for s in scenes]),
    }
    return x, y


@torch.no_grad()
def render_accuracy(model: ToyClassifier, seeds, stripe_shade: float = STRIPE_SHADE) -> dict[str, float]:
    """Accuracy of ``model`` on clean single-object renders of ``seeds`` with stripes at ``stripe_shade``.

    Returns fractions in [0, 1]: ``{"shape", "color", "texture", "shape_and_color"}``.
    """
    x, y = _batch(seeds, [stripe_shade] * len(seeds))
    pred = {k: v.argmax(-1) for k, v in model(x).items()}
    both = ((pred["shape"] == y["shape"]) & (pred["color"] == y["color"])).float().mean().item()
    return {k: (pred[k] == y[k]).float().mean().item() for k in pred} | {"shape_and_color": both}


def train_classifier(
    steps: int = 2500,
    batch: int = 64,
    seed: int = 0,
    out: Path | None = None,
    stripe_shades: tuple[float, ...] = (STRIPE_SHADE,),
) -> dict:
    """Train on fresh single-object renders (seeds from 2e9 upwards, never used elsewhere); save fp16.

    Each render's striped bands take one of ``stripe_shades`` (shares of the colour) at random. Returns the
    held-out accuracies on 1,000 clean renders (seeds 3e9..) per shade: ``{shade: {"shape", "color",
    "texture", "shape_and_color"}}`` (fractions in [0, 1]).
    """
    from safetensors.torch import save_file

    if not stripe_shades or not all(0.0 < h <= 1.0 for h in stripe_shades):
        raise ValueError(f"stripe_shades must be shares of the colour in (0, 1], got {stripe_shades}")

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    for step in range(1, steps + 1):
        seeds = 2_000_000_000 + rng.integers(0, 10**8, batch)
        # one shade draws nothing, so the single-world classifier's seeds are those it was trained with
        shades = rng.choice(stripe_shades, batch) if len(stripe_shades) > 1 else None
        x, y = _batch(seeds, shades)
        logits = model(_augment(x, g))
        loss = sum(F.cross_entropy(logits[k], y[k]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(json.dumps({"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - t0, 1)}))
    model.eval()
    # held-out accuracy on fresh renders (seeds 3e9..), clean
    held_out = range(3_000_000_000, 3_000_001_000)
    metrics = {str(shade): render_accuracy(model, held_out, shade) for shade in stripe_shades}
    out = out or classifier_path()
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.half().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors")
    )
    (out / "config.json").write_text(
        json.dumps(
            {
                "width": 16,
                "shapes": list(SHAPES),
                "colors": list(COLORS),
                "textures": list(TEXTURES),
                "steps": steps,
                "batch": batch,
                "seed": seed,
                "stripe_shades": [float(h) for h in stripe_shades],
                "train_seconds": round(time.time() - t0, 1),
                "heldout_accuracy": metrics,
            },
            indent=2,
        )
        + "\n"
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the toy-world classifier.")
    p.add_argument("--train", action="store_true")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--stripe-shades",
        default=str(STRIPE_SHADE),
        help="comma-separated shades of the striped bands to train on (shares of the colour), e.g. 0.55,0.8",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shades = tuple(float(h) for h in args.stripe_shades.split(","))
    if args.train:
        out = Path(args.out) if args.out else None
        print(json.dumps(train_classifier(args.steps, args.batch, args.seed, out, stripe_shades=shades)))


if __name__ == "__main__":
    main()
