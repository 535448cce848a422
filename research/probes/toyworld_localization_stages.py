"""Where the published localizer loses objects on the toy world: each stage against ground truth.

    python research/probes/toyworld_localization_stages.py [--scenes 200] [--stage-scenes 50] [--threads 2]
        [--radius-range 10 15]   # the first world's object sizes

1. **Stages** (``--stage-scenes`` scenes of the quality benchmark, seeds 20,000 + i, 2 objects for even i
   and 3 for odd i): the mIoU an oracle would reach by taking, for each object, the union of the chosen
   FINCH level's candidate clusters that lie mostly (> 1/2) inside it, from all candidates
   ("pre-clustering") and from those the [EOT] filter keeps ("after the filter"); the localizer's own mIoU
   and exact-count rate; K-means given K = objects + 1 for comparison. And a census of the concepts it
   returns: mostly background (< 1/2 inside any object), extra fragments of an object that has one
   already, spanning two objects (> 1/5 of the concept in each), and the objects no concept covers.
   For the spanning concepts, whether the objects they span touch (their masks, grown by one pixel,
   overlap: occlusion or contact) and where they were joined: already inside one kept candidate cluster
   ("pre-clustering") or by the post-clustering merge, whose threshold is the chosen level's tau; with
   the cluster count and tau of the chosen level. And the model's side of it: the smallest symmetric KL
   between two ground-truth objects' mean self-attention rows (the distance the post-clustering compares
   with tau), and how often it is below tau.
2. **[EOT] filter per object attribute** (``--scenes`` scenes, seeds from ``--seed-start``). The published
   filter keeps a cluster when its EOT score (mean of the min-max normalised [EOT] map of the empty prompt
   inside the cluster / mean over the image, ``localization.eot_scores``) is above 1. Here the "cluster" is
   the ground-truth object itself (its mask on the latent grid, area >= 1/2 of a cell): a perfect
   pre-clustering would still lose the objects whose score is <= 1. Per colour, texture and shape: the
   mean score, the share of objects with score > 1, and the object / background ratio of the raw map at
   image resolution (property (b) of issue 4, per object); and the share of scenes where every object
   passes.

Shipped toy model by default (or ``--model``). Prints markdown tables and writes JSON
(``.toyworld-runs/probes/toyworld_localization_stages.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _paths  # noqa: F401  (sys.path: the repository root and benchmarks/)
import numpy as np
import torch
import torch.nn.functional as F

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.clustering import masks_touch, pairwise_distance
from diffusers_conceptexpress.evaluation import mask_metrics
from diffusers_conceptexpress.localization import eot_scores
from diffusers_conceptexpress.toyworld import COLORS, SHAPES, model_path, render_scene
from toyworld import add_world_arguments, world_options  # benchmarks/toyworld.py


def object_scores(pipe, seed: int, num_objects: int, world=None) -> list[dict]:
    """Per ground-truth object of one scene: its attributes, filter score and raw object/background ratio."""
    scene = render_scene(seed, num_objects=num_objects, **(world or {}))
    # the [EOT] map does not depend on the localizer; k-means is the cheapest one that returns it
    res = pipe.localize_concepts(
        scene.image, method="kmeans", num_concepts=2, generator=torch.Generator().manual_seed(0)
    )
    h, w = res.latent_masks.shape[-2:]
    eot = res.eot_map.float()
    grid = F.interpolate(eot[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    image = F.interpolate(eot[None, None], size=scene.masks[0].shape, mode="bilinear")[0, 0].numpy()
    gt = torch.from_numpy(np.stack(scene.masks)).float()[:, None]
    latent_masks = F.adaptive_avg_pool2d(gt, (h, w))[:, 0] >= 0.5
    scores = eot_scores(grid, latent_masks)
    background = image[~np.any(scene.masks, axis=0)].mean()
    return [
        {
            "seed": seed,
            "color": obj["color"],
            "texture": obj.get("texture", "plain"),
            "shape": obj["shape"],
            "score": float(score),
            "ratio": float(image[mask].mean() / background),
        }
        for obj, mask, score in zip(scene.objects, scene.masks, scores, strict=True)
    ]


def _upsample(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return (
        F.interpolate(torch.from_numpy(mask)[None, None].float(), size=size, mode="nearest")[0, 0]
        .bool()
        .numpy()
    )


def stage_record(pipe, seed: int, num_objects: int, world=None) -> dict:
    """Oracle mIoUs of the pre-clustering and of the kept clusters, the result's mIoU, and its concept census."""
    scene = render_scene(seed, num_objects=num_objects, **(world or {}))
    res = pipe.localize_concepts(
        scene.image, generator=torch.Generator().manual_seed(0), return_attention=True
    )
    km = pipe.localize_concepts(
        scene.image, method="kmeans", num_concepts=num_objects + 1, generator=torch.Generator().manual_seed(0)
    )
    cand = res.details.candidate_labels.numpy()
    kept = res.details.kept.numpy()
    size = scene.masks[0].shape
    # each object on the latent grid: the cells it covers at least half of
    on_grid = [
        (F.adaptive_avg_pool2d(torch.from_numpy(gt).float()[None, None], cand.shape)[0, 0] >= 0.5).numpy()
        for gt in scene.masks
    ]

    def oracle(allowed: np.ndarray) -> float:
        ious = []
        for gt, cells in zip(scene.masks, on_grid, strict=True):
            union = np.zeros(cand.shape, dtype=bool)
            for c in range(cand.max() + 1):
                member = cand == c
                if allowed[c] and (member & cells).sum() > 0.5 * member.sum():
                    union |= member
            up = _upsample(union, size)
            ious.append((up & gt).sum() / max((up | gt).sum(), 1))
        return float(np.mean(ious))

    masks = [np.asarray(m, dtype=bool) for m in res.masks]
    owners, spanning, touching, joined_pre = [], 0, 0, 0
    kept_candidates = [_upsample(cand == c, size) for c in range(cand.max() + 1) if kept[c]]
    for m in masks:
        inside = [(m & gt).sum() / max(m.sum(), 1) for gt in scene.masks]
        owners.append(int(np.argmax(inside)) if max(inside) > 0.5 else None)
        spanned = [j for j, f in enumerate(inside) if f > 0.2]
        if len(spanned) >= 2:
            spanning += 1
            gts = [scene.masks[j] for j in spanned]
            touch = masks_touch(torch.from_numpy(np.stack(gts)))
            touching += int(bool((touch & ~torch.eye(len(gts), dtype=torch.bool)).any()))
            # the concept is a union of kept candidates: was one of them spanning the objects already?
            parts = [up for up in kept_candidates if (up & m).sum() > 0.5 * up.sum()]
            joined_pre += int(any(sum((up & gt).sum() > 0.2 * up.sum() for gt in gts) >= 2 for up in parts))
    counts = [owners.count(j) for j in range(num_objects)]
    d = res.details
    cells = [torch.from_numpy(c.reshape(-1)) for c in on_grid]
    rows = torch.stack([res.attention[c].mean(0) for c in cells if c.any()])
    between = pairwise_distance(rows, metric="symmetric_kl")[~torch.eye(rows.shape[0], dtype=torch.bool)]
    return {
        "oracle_pre": oracle(np.ones(len(kept), dtype=bool)),
        "oracle_kept": oracle(kept),
        "miou": mask_metrics(scene.masks, masks).miou,
        "kmeans_miou": mask_metrics(scene.masks, [np.asarray(m, dtype=bool) for m in km.masks]).miou,
        "exact": len(masks) == num_objects,
        "background": owners.count(None),
        "fragments": sum(max(c - 1, 0) for c in counts),
        "spanning": spanning,
        "missed": counts.count(0),
        "spanning_touching": touching,
        "spanning_joined_pre": joined_pre,
        "objects": num_objects,
        "concepts": len(masks),
        "level_clusters": d.cluster_counts[d.level],
        "tau": d.threshold,
        "closest_objects": float(between.min()) if between.numel() else None,
    }


def _markdown_row(values) -> str:
    return "| " + " | ".join(str(v) for v in values) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped toy model)")
    p.add_argument("--scenes", type=int, default=200, help="scenes of the per-attribute part (0: skip it)")
    p.add_argument("--seed-start", type=int, default=30_000)
    p.add_argument("--stage-scenes", type=int, default=50)
    p.add_argument("--stage-seed-start", type=int, default=20_000)
    add_world_arguments(p)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=".toyworld-runs/probes/toyworld_localization_stages.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = ConceptExpressPipeline.from_pretrained(args.model or model_path())
    pipe.set_progress_bar_config(disable=True)
    world = world_options(args)  # render_scene's options
    summary: dict = dict(world)

    stages = [
        stage_record(pipe, args.stage_seed_start + i, 2 + i % 2, world) for i in range(args.stage_scenes)
    ]
    keys = ("oracle_pre", "oracle_kept", "miou", "exact", "kmeans_miou")
    summary["stages"] = {key: float(np.mean([r[key] for r in stages])) for key in keys}
    census_keys = ("objects", "concepts", "background", "fragments", "spanning", "missed")
    census_keys += ("spanning_touching", "spanning_joined_pre")
    summary["census"] = {key: int(sum(r[key] for r in stages)) for key in census_keys}
    st = summary["stages"]
    print(
        f"Stages, {args.stage_scenes} scenes (seeds {args.stage_seed_start}-"
        f"{args.stage_seed_start + args.stage_scenes - 1}), radius range {world['radius_range'] or 'of the world'}:\n"
    )
    print(
        "| oracle on the pre-clustering | oracle on the kept clusters | localizer mIoU | exact count | "
        "k-means (K = objects + 1) mIoU |\n|---|---|---|---|---|"
    )
    print(
        _markdown_row(
            [
                f"{st['oracle_pre']:.3f}",
                f"{st['oracle_kept']:.3f}",
                f"{st['miou']:.3f}",
                f"{st['exact']:.0%}",
                f"{st['kmeans_miou']:.3f}",
            ]
        )
        + "\n"
    )
    print(
        "| objects | concepts returned | mostly background | extra fragments | spanning 2 objects | "
        "objects missed | spanning: objects touch | spanning: joined in a candidate |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    print(_markdown_row(summary["census"].values()) + "\n")  # fmt: skip
    # the chosen level (the last with >= 10 clusters): a coarse one has a large tau, and the post-clustering
    # then merges every pair of touching kept clusters closer than it
    summary["scenes"] = [{"seed": args.stage_seed_start + i, **r} for i, r in enumerate(stages)]
    print(
        "| chosen level | scenes | tau (mean) | exact count | with a spanning concept | with an extra concept |"
    )
    print("|---|---|---|---|---|---|")
    for name, group in (
        ("<= 15 clusters", [r for r in stages if r["level_clusters"] <= 15]),
        ("> 15 clusters", [r for r in stages if r["level_clusters"] > 15]),
    ):
        if group:
            print(_markdown_row([name, len(group), f"{np.mean([r['tau'] for r in group]):.3f}",
                                 f"{np.mean([r['exact'] for r in group]):.0%}",
                                 sum(r["spanning"] > 0 for r in group),
                                 sum(r["concepts"] > r["objects"] for r in group)]))  # fmt: skip
    close = [r for r in stages if r["closest_objects"] is not None and r["closest_objects"] <= r["tau"]]
    far = [r for r in stages if r not in close]
    closest = [r["closest_objects"] for r in stages if r["closest_objects"] is not None]
    print(
        f"\nTwo objects' mean attention rows closer than tau (sym. KL; median over scenes of the closest pair "
        f"{np.median(closest):.3f}):\n\n| scenes | with a spanning concept |\n|---|---|"
    )
    for name, group in (("closest pair <= tau", close), ("closest pair > tau", far)):
        print(_markdown_row([f"{name}: {len(group)}", sum(r["spanning"] > 0 for r in group)]))
    print()

    if args.scenes:
        rows, scenes_ok = [], []
        for i in range(args.scenes):
            objects = object_scores(pipe, args.seed_start + i, 2 + i % 2, world)
            rows += objects
            scenes_ok.append(all(o["score"] > 1 for o in objects))
        groups = {"all objects": rows}
        for key, values in (("color", COLORS), ("texture", ("plain", "striped")), ("shape", SHAPES)):
            for value in values:
                groups[f"{key}: {value}"] = [r for r in rows if r[key] == value]
        table = {
            name: {
                "objects": len(g),
                "mean_score": float(np.mean([r["score"] for r in g])),
                "kept": float(np.mean([r["score"] > 1 for r in g])),
                "mean_ratio": float(np.mean([r["ratio"] for r in g])),
            }
            for name, g in groups.items()
            if g
        }
        summary["scenes_all_kept"] = float(np.mean(scenes_ok))
        summary["groups"] = table
        print(
            f"[EOT] filter per attribute, {args.scenes} scenes (seeds {args.seed_start}-"
            f"{args.seed_start + args.scenes - 1}); every object passes in {np.mean(scenes_ok):.0%} of them\n"
        )
        print("| objects | n | filter score (mean) | score > 1 (kept) | object / background, raw map |\n"
              "|---|---|---|---|---|")  # fmt: skip
        for name, t in table.items():
            print(_markdown_row([name, t["objects"], f"{t['mean_score']:.2f}", f"{t['kept']:.0%}",
                                 f"{t['mean_ratio']:.2f}"]))  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
