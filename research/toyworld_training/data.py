"""Training data: batches of rendered scenes, the pool of encoded scenes, and what a step draws from them
(flips, noised latents, one object per scene and its mask on the latent grid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusers_conceptexpress.toyworld.scenes import IMAGE_SIZE, RIM_WIDTH, STRIPE_SHADE, render_scene

from .models import LATENT, MAX_LEN, load_vae

SEED_OFFSET_TRAIN = 1_000_000  # training scenes use seeds >= this; held-out / test scenes use small seeds


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def scene_batch(seeds, labels: bool = False, rim: int = RIM_WIDTH, stripe_shade: float = STRIPE_SHADE):
    """Images (B, 3, 64, 64) in [-1, 1] and captions of scenes ``seeds`` (``rim``, ``stripe_shade``: see
    ``render_scene``);
    with ``labels``, also their object label maps (B, 64, 64) uint8: 0 = background, i + 1 = the visible
    pixels of object i."""
    scenes = [render_scene(int(s), rim=rim, stripe_shade=stripe_shade) for s in seeds]
    out = to_tensor([s.image for s in scenes]), [s.caption for s in scenes]
    if not labels:
        return out
    maps = np.zeros((len(scenes), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for b, scene in enumerate(scenes):
        for i, m in enumerate(scene.masks):
            maps[b][m] = i + 1
    return (*out, torch.from_numpy(maps))


def pool_batches(
    run_dir: Path, starts: list[int], size: int, rim: int, threads: int, stripe_shade: float = STRIPE_SHADE
) -> list[tuple]:
    """Pool batches of 256 scenes beginning at ``starts``: (latents fp16, token ids, images uint8, labels)."""
    from transformers import CLIPTokenizer

    torch.set_num_threads(threads)
    vae = load_vae(run_dir)
    tokenizer = CLIPTokenizer.from_pretrained(run_dir / "tokenizer")
    out = []
    for start in starts:
        seeds = range(SEED_OFFSET_TRAIN + start, SEED_OFFSET_TRAIN + min(size, start + 256))
        x, caps, lab = scene_batch(seeds, labels=True, rim=rim, stripe_shade=stripe_shade)
        with torch.no_grad():
            lat = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).half()
        ids = tokenizer(caps, padding="max_length", max_length=MAX_LEN, return_tensors="pt").input_ids
        out.append((lat, ids, ((x + 1) * 127.5).round().to(torch.uint8), lab))
    return out


def object_latent_masks(labels: torch.Tensor, objects: torch.Tensor, size: int = LATENT) -> torch.Tensor:
    """Each scene's chosen object on the latent grid, as the method puts a mask there (area share > 0.5).

    Args:
        labels: (B, H, W) uint8 label maps (0 = background, k + 1 = object k; ``scene_batch``).
        objects: (B,) long, the object k of each scene.
    Returns:
        (B, 1, size, size) float32 in {0, 1}.
    """
    hit = (labels.long() == (objects[:, None, None] + 1)).float()[:, None]
    return (F.interpolate(hit, size=(size, size), mode="area") > 0.5).float()


def flipped(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(B, ...) with item b mirrored left-right where ``flip[b]`` (the pool's horizontal-flip augmentation)."""
    return torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)


def noised(
    alphas_cumprod: torch.Tensor, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """(B, 4, h, w): the forward process at timesteps ``t``, sqrt(acp) z0 + sqrt(1 - acp) eps."""
    a = alphas_cumprod[t].sqrt()[:, None, None, None]
    s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
    return a * z0 + s * eps


def pick_objects(
    index: torch.Tensor, labels: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One object k of each scene, uniformly among its objects (one draw from ``g``), and its latent mask.

    Args:
        index: (B, max objects) the scenes' rows of a ``_caption_index`` (-1 past their last object).
        labels: (B, H, W) the scenes' label maps, flipped as their latents are.
    Returns:
        k (B,) long, and ``object_latent_masks`` of those objects, (B, 1, 32, 32).
    """
    count = (index >= 0).sum(1)
    k = (torch.rand(len(index), generator=g) * count).long().clamp(max=index.shape[1] - 1)
    return k, object_latent_masks(labels, k)
