"""Can the shipped VAE and ``toyworld.classify`` carry the rim world's outlines?

    python research/probes/toyworld_rim_vae.py [--scenes 64] [--threads 2]

Encodes and decodes fresh scenes (seeds 40,000+, 1-3 objects) of the second world (``rim=0``) and of the rim
world (``rim=RIM_WIDTH``) with the shipped VAE (posterior mean) and prints the reconstruction PSNR (images in
[-1, 1]). Then ``classify`` reads fresh single-object rim scenes (seeds 41,000+): the renders and their VAE
reconstructions, shape and colour against the ground truth. Writes
``.toyworld-runs/probes/toyworld_rim_vae.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import _paths  # noqa: F401  (sys.path: the repository root and benchmarks/)
import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL

from diffusers_conceptexpress.atomic import atomic_file
from diffusers_conceptexpress.toyworld import classify, model_path, render_scene
from diffusers_conceptexpress.toyworld.scenes import RIM_WIDTH
from research.toyworld_training.data import to_tensor


@torch.no_grad()
def reconstruct(vae, images) -> tuple[torch.Tensor, torch.Tensor]:
    x = to_tensor(images)
    return x, vae.decode(vae.encode(x).latent_dist.mean).sample


def to_images(x: torch.Tensor) -> list[PIL.Image.Image]:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [PIL.Image.fromarray(a) for a in arr]


def accuracy(images, scenes) -> dict:
    found = classify(images)
    return {
        key: float(np.mean([f[key] == s.objects[0][key] for f, s in zip(found, scenes, strict=True)]))
        for key in ("shape", "color")
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=64)
    p.add_argument("--single", type=int, default=100, help="single-object scenes for classify")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(".toyworld-runs/probes/toyworld_rim_vae.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    vae = AutoencoderKL.from_pretrained(model_path(), subfolder="vae")
    out = {}
    for rim in (0, RIM_WIDTH):
        x, rec = reconstruct(
            vae, [render_scene(s, rim=rim).image for s in range(40_000, 40_000 + args.scenes)]
        )
        out[f"psnr_db_rim{rim}"] = 10 * math.log10(4.0 / float(((rec - x) ** 2).mean()))
    single = [render_scene(s, num_objects=1, rim=RIM_WIDTH) for s in range(41_000, 41_000 + args.single)]
    out["classify_renders"] = accuracy([s.image for s in single], single)
    out["classify_reconstructions"] = accuracy(
        to_images(reconstruct(vae, [s.image for s in single])[1]), single
    )
    print(json.dumps(out, indent=1))
    with atomic_file(args.out, "w") as handle:
        json.dump({"args": {k: str(v) for k, v in vars(args).items()}, **out}, handle, indent=1)


if __name__ == "__main__":
    main()
