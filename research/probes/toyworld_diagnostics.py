"""Diagnostics of the shipped toy-world model (issue 4, item 3) on fresh scenes with ground truth.

On ``--scenes`` fresh 2-3-object scenes (seeds from ``--seed-start``; the training pool uses seeds >= 1e6):

(a) k-means with the true K on the method's aggregated self-attention (published defaults otherwise), via
    ``ConceptExpressPipeline.localize_concepts(image, method="kmeans", num_concepts=K)``; mIoU of the
    objects after Hungarian matching at image resolution (an unmatched object counts 0). Two readings of
    "true K": K = objects + 1 (the background is a region too; primary) and K = objects.
(b) the [EOT] map of the empty prompt (``result.eot_map``, the map the background filter uses), bilinearly
    upsampled to image resolution: mean over object pixels / mean over background pixels, and the share of
    scenes where it is > 1.
(c) text-to-image: every shape-colour pair, ``--samples`` images each from "a photo of a {color} {shape}"
    (DDIM ``--steps``, guidance ``--guidance``), read by ``toyworld.classify``.
(d) ``localize_concepts`` with its published defaults (FINCH, >= 10 clusters, EOT filter, post-clustering):
    Hungarian mIoU at image resolution (missed objects count 0) and the share of scenes with exactly the
    right number of concepts.

Prints a table and writes JSON (default ``.toyworld-runs/probes/toyworld_diagnostics.json``)::

    python research/probes/toyworld_diagnostics.py --scenes 50 --samples 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _paths  # noqa: F401  (sys.path: the repository root and benchmarks/)
import numpy as np
import torch
import torch.nn.functional as F

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.evaluation import mask_metrics
from diffusers_conceptexpress.toyworld import COLORS, SHAPES, classify, model_path, render_scene
from toyworld import add_world_arguments, world_options  # benchmarks/toyworld.py


def matched_miou(gt: list[np.ndarray], pred: list[np.ndarray]) -> float:
    """Hungarian-matched mean IoU over the ground-truth masks; unmatched ground truth counts 0."""
    return mask_metrics(gt, pred).miou


def eot_ratio(eot_map: torch.Tensor, masks: list[np.ndarray]) -> float:
    size = masks[0].shape
    eot = F.interpolate(eot_map[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
    eot = eot.numpy()
    obj = np.any(masks, axis=0)
    return float(eot[obj].mean() / max(float(eot[~obj].mean()), 1e-12))


def localization_diagnostics(
    pipe: ConceptExpressPipeline, seeds: list[int], world=None
) -> tuple[dict, list[dict]]:
    rows = []
    for s in seeds:
        scene = render_scene(s, num_objects=2 + s % 2, **(world or {}))
        n = len(scene.masks)
        gen = torch.Generator().manual_seed(0)
        km1 = pipe.localize_concepts(scene.image, method="kmeans", num_concepts=n + 1, generator=gen)
        km0 = pipe.localize_concepts(scene.image, method="kmeans", num_concepts=n, generator=gen)
        ce = pipe.localize_concepts(scene.image)
        masks = lambda r: [np.asarray(m, dtype=bool) for m in r.masks]  # noqa: E731
        rows.append(
            {
                "seed": s,
                "objects": n,
                "caption": scene.caption,
                "kmeans_k_plus_bg_miou": matched_miou(scene.masks, masks(km1)),
                "kmeans_k_miou": matched_miou(scene.masks, masks(km0)),
                "eot_ratio": eot_ratio(km1.eot_map, scene.masks),
                "default_miou": matched_miou(scene.masks, masks(ce)),
                "default_count": len(ce.masks),
                "default_cluster_counts": list(ce.cluster_counts),
            }
        )
    ratios = np.array([r["eot_ratio"] for r in rows])
    summary = {
        "scenes": len(rows),
        "a_kmeans_k_plus_bg_miou": float(np.mean([r["kmeans_k_plus_bg_miou"] for r in rows])),
        "a_kmeans_k_miou": float(np.mean([r["kmeans_k_miou"] for r in rows])),
        "b_eot_ratio_mean": float(ratios.mean()),
        "b_eot_ratio_median": float(np.median(ratios)),
        "b_eot_share_gt1": float((ratios > 1).mean()),
        "d_default_miou": float(np.mean([r["default_miou"] for r in rows])),
        "d_default_exact_count": float(np.mean([r["default_count"] == r["objects"] for r in rows])),
        "d_default_mean_count": float(np.mean([r["default_count"] for r in rows])),
    }
    return summary, rows


def per_factor_diagnostics(pipe: ConceptExpressPipeline, seeds: list[int], world=None) -> dict:
    """k-means (K = objects + 1) mIoU when only some self-attention layers are aggregated (an option of the
    method's config, not a change of the method): which resolutions carry the object structure."""
    variants = {
        "all (published)": {},
        "32x32 layers only": {"self_attention_factors": [1]},
        "16x16 layers only": {"self_attention_factors": [2]},
        "8x8 layers only": {"self_attention_factors": [4]},
        "32+16 layers": {"self_attention_factors": [1, 2]},
        "all, uniform weighting": {"self_attention_weighting": "uniform"},
    }
    out = {}
    for name, opts in variants.items():
        vals = []
        for s in seeds:
            scene = render_scene(s, num_objects=2 + s % 2, **(world or {}))
            res = pipe.localize_concepts(
                scene.image,
                method="kmeans",
                num_concepts=len(scene.masks) + 1,
                generator=torch.Generator().manual_seed(0),
                **opts,
            )
            vals.append(matched_miou(scene.masks, [np.asarray(m, dtype=bool) for m in res.masks]))
        out[name] = float(np.mean(vals))
    return out


def text_to_image(
    model: str, samples: int, steps: int, guidance: float, seed: int
) -> tuple[dict, list, list]:
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, feature_extractor=None, requires_safety_checker=False, dtype=torch.float32
    )
    sd.set_progress_bar_config(disable=True)
    pairs = [(c, s) for s in SHAPES for c in COLORS]
    prompts = [f"a photo of a {c} {s}" for c, s in pairs]
    size = int(sd.unet.config.sample_size) * sd.vae_scale_factor
    images = []
    for start in range(0, len(prompts), 16):
        out = sd(
            prompts[start : start + 16],
            num_images_per_prompt=samples,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(seed + start),
        )
        images += out.images
    preds = classify(images)
    rows = []
    for k, pred in enumerate(preds):
        color, shape = pairs[k // samples]
        rows.append({"prompt": prompts[k // samples], **pred, "want_shape": shape, "want_color": color})
    shape_ok = np.array([r["shape"] == r["want_shape"] for r in rows])
    color_ok = np.array([r["color"] == r["want_color"] for r in rows])
    summary = {
        "images": len(rows),
        "c_shape_acc": float(shape_ok.mean()),
        "c_color_acc": float(color_ok.mean()),
        "c_both_acc": float((shape_ok & color_ok).mean()),
        "steps": steps,
        "guidance": guidance,
    }
    return summary, rows, images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped toy model)")
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--seed-start", type=int, default=10_000)
    p.add_argument("--samples", type=int, default=2, help="images per shape-colour pair")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-t2i", action="store_true")
    add_world_arguments(p)
    p.add_argument("--per-factor-scenes", type=int, default=50, help="scenes for the per-resolution table")
    p.add_argument("--grid", default=None, help="save the generated images as one PNG grid here")
    p.add_argument("--out", default=".toyworld-runs/probes/toyworld_diagnostics.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or model_path()
    t0 = time.time()
    pipe = ConceptExpressPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seed_start, args.seed_start + args.scenes))
    world = world_options(args)  # render_scene's options
    loc, loc_rows = localization_diagnostics(pipe, seeds, world)
    per_factor = (
        per_factor_diagnostics(pipe, seeds[: args.per_factor_scenes], world) if args.per_factor_scenes else {}
    )
    t_loc = time.time() - t0
    t2i, t2i_rows = {}, []
    if not args.skip_t2i:
        t2i, t2i_rows, images = text_to_image(model, args.samples, args.steps, args.guidance, seed=0)
        if args.grid:
            from PIL import Image

            cols = len(COLORS) * args.samples
            w = images[0].width
            grid = Image.new("RGB", (cols * w, len(SHAPES) * w))
            for k, im in enumerate(images):
                grid.paste(im, ((k % cols) * w, (k // cols) * w))
            grid.save(args.grid)
    result = {
        "model": str(model),
        "scenes_seeds": [seeds[0], seeds[-1]],
        **world,
        **loc,
        **t2i,
        "kmeans_miou_by_layers": per_factor,
        "seconds_localization": round(t_loc, 1),
        "seconds_total": round(time.time() - t0, 1),
        "threads": args.threads,
        "acceptance": {
            "a_kmeans_miou>=0.60": loc["a_kmeans_k_plus_bg_miou"] >= 0.60,
            "b_eot_share_gt1>=0.80": loc["b_eot_share_gt1"] >= 0.80,
            "c_both_acc>=0.85": t2i.get("c_both_acc", 0.0) >= 0.85 if t2i else None,
            "d_default_miou>=0.60": loc["d_default_miou"] >= 0.60,
            "d_default_exact_count>=0.60": loc["d_default_exact_count"] >= 0.60,
        },
        "per_scene": loc_rows,
        "per_image": t2i_rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'metric':44s} value")
    for key in (
        "a_kmeans_k_plus_bg_miou",
        "a_kmeans_k_miou",
        "b_eot_ratio_mean",
        "b_eot_ratio_median",
        "b_eot_share_gt1",
        "c_shape_acc",
        "c_color_acc",
        "c_both_acc",
        "d_default_miou",
        "d_default_exact_count",
        "d_default_mean_count",
    ):
        if key in result:
            print(f"{key:44s} {result[key]:.3f}")
    for key, val in per_factor.items():
        print(f"{'k-means K+1 mIoU, ' + key:44s} {val:.3f}")
    for key, ok in result["acceptance"].items():
        print(f"{key:44s} {'met' if ok else ('-' if ok is None else 'NOT met')}")
    print(f"wrote {out} ({result['seconds_total']} s)")


if __name__ == "__main__":
    main()
