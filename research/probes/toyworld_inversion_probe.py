"""Why do learned toy tokens carry the colour of their object but not its shape? A probe.

    python research/probes/toyworld_inversion_probe.py [--scenes 6] [--variants gt,full,dilate8] [--shard K/N]
        [--option schedule=faithful --tag @faithful] [--texture striped] [--stripe-shade 0.8]

Learns ONE concept from single-object toy scenes (seeds 30,000 + i, one object) with
``extract_concepts(masks=[...])`` and the published learning defaults (``schedule="fast"``), under
different masks given to the masked diffusion loss:

- ``gt``: the object's ground-truth mask (what the benchmark's GT variants do);
- ``full``: the whole image (plain textual inversion: the loss sees the object's outline);
- ``dilateN``: the ground-truth mask grown by N image pixels (a ring of background around the object).

Then ``--samples`` generations of "a photo of <c>" (DDIM ``--inference-steps``, CFG ``--guidance``) are
classified by ``toyworld.classify``: the share with the right shape, the right colour, and both, per
variant. For reference, the same for the word prompt "a photo of a {colour} {shape}" of each object.
Writes ``.toyworld-runs/probes/toyworld_inversion_probe.json`` (rows accumulate per scene and variant in
``--work``, per model, so shards and later sessions resume) and, with ``--grid``, a picture of the generations.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _paths  # noqa: F401  (sys.path: the repository root and benchmarks/)
import numpy as np
import torch
from scipy import ndimage

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.atomic import atomic_file
from diffusers_conceptexpress.evaluation import generate_samples, read_samples
from diffusers_conceptexpress.toyworld import classify, model_path, render_scene
from diffusers_conceptexpress.visualize import image_grid
from toyworld import add_world_arguments, model_fingerprint, world_options  # benchmarks/toyworld.py


def probe_mask(scene, variant: str) -> np.ndarray:
    """The mask of ``variant`` for a single-object scene (bool, image size)."""
    mask = np.asarray(scene.masks[0], dtype=bool)
    if variant == "gt":
        return mask
    if variant == "full":
        return np.ones_like(mask)
    if variant.startswith("dilate"):
        radius = int(variant[len("dilate") :])
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        return ndimage.binary_dilation(mask, structure=(yy**2 + xx**2) <= radius**2)
    raise ValueError(f"Unknown variant {variant!r}: use gt, full or dilateN.")


def score(images, obj: dict) -> dict:
    found = classify(images)
    shape = [f["shape"] == obj["shape"] for f in found]
    color = [f["color"] == obj["color"] for f in found]
    return {
        "shape": float(np.mean(shape)),
        "color": float(np.mean(color)),
        "both": float(np.mean([s and c for s, c in zip(shape, color, strict=True)])),
        "found": [f"{f['color']} {f['shape']}" for f in found],
    }


def probe_seeds(start: int, count: int, texture: str = "any") -> list[int]:
    """The first ``count`` seeds from ``start`` whose single object has ``texture`` ("any": every seed)."""
    seeds, seed = [], start
    while len(seeds) < count:
        if texture == "any" or render_scene(seed, num_objects=1).objects[0]["texture"] == texture:
            seeds.append(seed)
        seed += 1
    return seeds


def parse_options(items: list[str]) -> dict:
    """``key=value`` pairs for ``extract_concepts`` (values read as JSON when they parse, else strings)."""
    options = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def learn_one(pipe, image, mask: np.ndarray, folder: Path, args, **options) -> float:
    """ONE concept learned from ``image`` under ``mask`` (published defaults and ``options``), then
    ``args.samples`` generations of "a photo of <c>" (``args.inference_steps``, ``args.guidance``, seeds from
    ``args.seed``) written to ``folder`` as ``concept_1_<i>.png``. Returns the learning's seconds."""
    t0 = time.perf_counter()
    out = pipe.extract_concepts(
        image, masks=[mask], generator=torch.Generator().manual_seed(args.seed), load=False, **options
    )
    seconds = time.perf_counter() - t0
    pipe.load_concepts(out)
    generate_samples(
        pipe, out.tokens, folder, samples=args.samples, seed=args.seed,
        steps=args.inference_steps, guidance=args.guidance,
    )  # fmt: skip
    return seconds


def run_one(pipe, seed: int, variant: str, args, work: Path) -> dict:
    name = variant if variant == "word" else variant + args.tag
    folder = work / name / str(seed)
    row_path = folder / "row.json"
    if row_path.is_file():
        return json.loads(row_path.read_text())
    scene = render_scene(seed, num_objects=1, **world_options(args))
    obj = scene.objects[0]
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if variant == "word":
        prompt = f"a photo of a {obj['color']} {obj['shape']}"
        images = pipe(
            prompt,
            num_images_per_prompt=args.samples,
            num_inference_steps=args.inference_steps,
            guidance_scale=args.guidance,
            generator=[torch.Generator().manual_seed(args.seed + i) for i in range(args.samples)],
        ).images
        for i, im in enumerate(images):
            im.save(folder / f"concept_1_{i}.png")
    else:
        learn_one(
            pipe, scene.image, probe_mask(scene, variant), folder, args,
            num_train_steps=args.steps, **parse_options(args.option),
        )  # fmt: skip
    row = {
        "seed": seed,
        "variant": name,
        "options": args.option,
        "object": f"{obj['color']} {obj['shape']}",
        "seconds": time.perf_counter() - t0,
        **score(read_samples(folder, "concept_1", args.samples), obj),
    }
    with atomic_file(row_path, "w") as handle:
        json.dump(row, handle)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=6)
    p.add_argument("--start", type=int, default=30000)
    p.add_argument("--variants", default="word,gt,full,dilate8")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--inference-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="K/N: this process runs scenes i with i %% N == K")
    p.add_argument("--model", default=None)
    add_world_arguments(p)  # --rim, --stripe-shade, --radius-range
    p.add_argument(
        "--texture", choices=("any", "plain", "striped"), default="any",
        help="only scenes whose object has this texture (the first --scenes such seeds from --start)",
    )  # fmt: skip
    p.add_argument(
        "--work", type=Path, default=None, help="default: .benchmark-runs/inversion_probe/<model fingerprint>"
    )
    p.add_argument("--out", type=Path, default=Path(".toyworld-runs/probes/toyworld_inversion_probe.json"))
    p.add_argument(
        "--grid", type=Path, default=None, help="PNG: source and generations per scene and variant"
    )
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="extract_concepts option for the learned variants, e.g. schedule=faithful (repeatable)",
    )  # fmt: skip
    p.add_argument("--tag", default="", help="suffix of the variants' names for runs with --option")
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    named = [v if v == "word" else v + args.tag for v in variants]
    k, n = (int(v) for v in args.shard.split("/"))
    seeds = probe_seeds(args.start, args.scenes, args.texture)
    pipe = ConceptExpressPipeline.from_pretrained(args.model or model_path())
    # scenes of another world than the shipped one: another fingerprint, another folder
    fingerprint = model_fingerprint(args.model or model_path(), world_options(args))
    args.work = args.work or Path(".benchmark-runs/inversion_probe") / fingerprint
    pipe.set_progress_bar_config(disable=True)
    if not args.summarize_only:
        for i, seed in enumerate(seeds):
            if i % n != k:
                continue
            for variant in variants:
                row = run_one(pipe, seed, variant, args, args.work)
                print(json.dumps({kk: v for kk, v in row.items() if kk != "found"}), flush=True)
    rows = []
    for variant in named:
        for seed in seeds:
            path = args.work / variant / str(seed) / "row.json"
            if path.is_file():
                rows.append(json.loads(path.read_text()))
    table = {}
    for variant in named:
        mine = [r for r in rows if r["variant"] == variant]
        if mine:
            table[variant] = {
                key: float(np.mean([r[key] for r in mine])) for key in ("shape", "color", "both", "seconds")
            } | {"scenes": len(mine)}
    print(f"{'variant':10s} {'shape':>6s} {'colour':>6s} {'both':>6s} {'s/scene':>8s} scenes")
    for variant, t in table.items():
        print(
            f"{variant:10s} {t['shape']:6.2f} {t['color']:6.2f} {t['both']:6.2f} {t['seconds']:8.0f} {t['scenes']}"
        )
    with atomic_file(args.out, "w") as handle:
        json.dump({"args": {kk: str(v) for kk, v in vars(args).items()}, "table": table, "rows": rows}, handle,
                  indent=1)  # fmt: skip
    if args.grid:
        tiles = []
        for seed in seeds:
            if not all((args.work / v / str(seed) / "row.json").is_file() for v in named):
                continue
            tiles.append(render_scene(seed, num_objects=1, **world_options(args)).image)
            for variant in named:
                tiles += read_samples(args.work / variant / str(seed), "concept_1", min(args.samples, 4))
        cols = 1 + len(variants) * min(args.samples, 4)
        if tiles:
            image_grid(tiles, columns=cols).save(args.grid)


if __name__ == "__main__":
    main()
