"""Pictures of what the method sees on toy scenes: attention rows per resolution, [EOT] maps, clusters.

    python research/probes/toyworld_attention_pictures.py [--model DIR | --unet-checkpoint RUN/unet.pt] \
        [--scenes 8] [--prefix docs/toyworld_]

Writes three PNGs (``<prefix>attention_rows.png``, ``<prefix>eot_maps.png``, ``<prefix>clusters.png``):

- attention rows: for the centre of every object and one background pixel, the aggregated self-attention row
  (published "reference" weighting) and the rows of the 32x32, 16x16 and 8x8 layers alone (each heat map
  scaled to its maximum);
- [EOT] maps: the empty prompt's [EOT] cross-attention map the background filter uses (min-max scaled);
- clusters: K-means with K = objects + 1, plain FINCH and the published ConceptExpress localization, each with
  its Hungarian-matched mIoU and mask count.
"""

from __future__ import annotations

import argparse

import _paths  # noqa: F401  (sys.path: the repository root and benchmarks/)
import numpy as np
import torch

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.attention import AttentionRecorder, capture_attention
from diffusers_conceptexpress.evaluation import mask_metrics
from diffusers_conceptexpress.image_io import prepare_image
from diffusers_conceptexpress.toyworld import model_path, render_scene
from diffusers_conceptexpress.visualize import heatmap, image_grid, overlay_masks


def load_pipeline(model: str | None, checkpoint: str | None) -> ConceptExpressPipeline:
    pipe = ConceptExpressPipeline.from_pretrained(model or model_path())
    if (
        checkpoint
    ):  # the EMA UNet of a training run (research.toyworld_training), on the shipped VAE and text encoder
        from research.toyworld_training.models import load_unet_checkpoint

        pipe.unet = load_unet_checkpoint(checkpoint)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def self_attention_rows(pipe, image, factors) -> tuple[torch.Tensor, tuple[int, int]]:
    """The aggregated (R^2, R^2) self-attention of the localization pass, restricted to ``factors``."""
    pixels, _ = prepare_image(image, pipe.default_resolution, multiple=pipe.size_multiple, policy="squash")
    latents = pipe.encode_pixels(pixels)
    h, w = latents.shape[-2:]
    embeds, _ = pipe.encode_prompt_ids([""])
    recorder = AttentionRecorder((h, w), self_factors=factors)
    with capture_attention(pipe.unet, recorder), torch.no_grad():
        pipe.unet(latents, torch.tensor([0]), encoder_hidden_states=embeds)
    return recorder.self_attention(release=True)[0], (h, w)


def attention_rows_picture(pipe, seeds) -> object:
    tiles, captions = [], []
    variants = (("aggregate", None), ("32x32", [1]), ("16x16", [2]), ("8x8", [4]))
    for seed, n in seeds:
        scene = render_scene(seed, num_objects=n)
        rows = {}
        for name, factors in variants:
            try:
                rows[name], (h, w) = self_attention_rows(pipe, scene.image, factors)
            except ValueError:  # no self-attention at that resolution (architecture without it)
                rows[name] = None
        scale = scene.image.width // w
        queries = []
        for m in scene.masks:
            ys, xs = np.nonzero(m)
            queries.append((int(ys.mean()) // scale, int(xs.mean()) // scale))
        queries.append((1, 1))
        for y, x in queries:
            marked = scene.image.copy()
            marked.putpixel((x * scale, y * scale), (255, 255, 255))
            tiles.append(marked)
            captions.append(f"scene {seed}, query ({y},{x})")
            for name, _ in variants:
                row = rows[name]
                if row is None:
                    tiles.append(scene.image.convert("L").convert("RGB"))
                    captions.append(f"{name}: none")
                    continue
                r = row[y * w + x].reshape(h, w)
                tiles.append(heatmap(r / r.max(), scene.image.size))
                captions.append(name)
    return image_grid(tiles, captions, columns=len(variants) + 1)


def eot_and_cluster_pictures(pipe, seeds) -> tuple[object, object]:
    eot_tiles, eot_caps, cl_tiles, cl_caps = [], [], [], []
    for seed, n in seeds:
        scene = render_scene(seed, num_objects=n)
        cl_tiles.append(scene.image)
        cl_caps.append(f"scene {seed}")
        runs = (
            ("K-means K+1", {"method": "kmeans", "num_concepts": n + 1}),
            ("FINCH", {"method": "finch"}),
            ("ours", {}),
        )
        for label, options in runs:
            res = pipe.localize_concepts(scene.image, generator=torch.Generator().manual_seed(0), **options)
            miou = mask_metrics(scene.masks, [np.asarray(m, dtype=bool) for m in res.masks]).miou
            cl_tiles.append(overlay_masks(scene.image, res.masks, alpha=0.8))
            cl_caps.append(f"{label}: mIoU {miou:.2f}, {len(res.masks)} masks")
        eot = res.eot_map
        eot_tiles += [
            scene.image,
            heatmap((eot - eot.min()) / (eot.max() - eot.min() + 1e-12), scene.image.size),
        ]
        eot_caps += [f"scene {seed}", f"[EOT] (factor {res.options['eot_factor_used']})"]
    return image_grid(eot_tiles, eot_caps, columns=4), image_grid(cl_tiles, cl_caps, columns=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped toy model)")
    p.add_argument("--unet-checkpoint", default=None, help="use this training run's EMA UNet instead")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--seed-start", type=int, default=10_000)
    p.add_argument("--prefix", default="docs/toyworld_")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, args.unet_checkpoint)
    seeds = [(args.seed_start + i, 2 + (args.seed_start + i) % 2) for i in range(args.scenes)]
    attention_rows_picture(pipe, seeds[:3]).save(f"{args.prefix}attention_rows.png")
    eot, clusters = eot_and_cluster_pictures(pipe, seeds)
    eot.save(f"{args.prefix}eot_maps.png")
    clusters.save(f"{args.prefix}clusters.png")
    print(f"wrote {args.prefix}attention_rows.png, {args.prefix}eot_maps.png, {args.prefix}clusters.png")


if __name__ == "__main__":
    main()
