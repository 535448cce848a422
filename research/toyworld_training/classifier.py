"""Train the toy-world classifier (``diffusers_conceptexpress.toyworld.classify``) on fresh renders.

The classifier reads the shape, colour and texture of the main object of an image (the extraction benchmark's
judge). It is trained on fresh single-object renders (seeds from 2e9 upwards, never used elsewhere) with blur,
noise and colour-jitter augmentation, so that it also reads the (softer) pictures the toy diffusion model
generates; striped objects are drawn with their dark bands at one of ``--stripe-shades`` (shares of the
colour), so that one classifier reads the worlds that differ only there. The shipped classifier, from the repository
root::

    python -m research.toyworld_training.classifier --train --steps 1500 --threads 1 --stripe-shades 0.55,0.8

``--out`` defaults to the package's ``model/classifier`` folder: the command above replaces the shipped
classifier (name another folder to compare first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusers_conceptexpress.toyworld.classify import ToyClassifier, _to_tensor, classifier_path
from diffusers_conceptexpress.toyworld.scenes import (
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    STRIPE_SHADE,
    TEXTURES,
    render_scene,
)

__all__ = ["main", "render_accuracy", "train_classifier"]


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
    p = argparse.ArgumentParser(
        prog="python -m research.toyworld_training.classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
