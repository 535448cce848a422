"""Does learning concepts TOGETHER cost the toy's tokens their object? Each object learned alone, paired.

    python research/probes/toyworld_alone.py --start 20005 --scenes 8 [--shard K/N] [--threads 1]
    python research/probes/toyworld_alone.py --start 20005 --scenes 8 --summarize-only --out <json>

The extraction benchmark (``benchmarks/toyworld.py``) learns all objects of a scene in ONE run with their
ground-truth masks (split tokens, SupCon between concepts, the joint prompt "a photo of <c_1> and <c_2>",
the attention alignment). Single-object probe scenes (``toyworld_inversion_probe.py``) learn one concept
from a scene that holds only that object. Between the two lie both the scene (neighbours, occlusion, sizes)
and the joint learning. This script keeps the benchmark's scenes and removes the joint learning: for every
object of the benchmark's scenes ``--start`` .. ``--start + --scenes - 1`` (the object counts of the
benchmark whose summary ``--joint`` is, same world),
``extract_concepts(image, masks=[that object's mask])`` with the published defaults and ``schedule="fast"``,
then ``--samples`` generations of "a photo of <c>" with the benchmark's generation protocol (DDIM 50,
guidance 7.5, seeds 0..samples-1), read by ``toyworld.classify``. The joint run's reading of the same object
comes from the benchmark's summary JSON (``--joint``: its ``fast, GT masks`` ``per_concept`` rows, which
must cover these scenes and use the same protocol).

``--isolate`` learns each object from its scene with the other objects painted over by the scene's background
(``render_scene(keep=[k])``: the object keeps its pixels and visible mask), and ``--baseline`` compares with
an earlier ``--out`` of this script (e.g. the same objects learned in their full scenes) instead of the joint
reading. ``--grow PX`` learns each object from its mask grown by a band of ``PX`` pixels that no other object
holds (``loss_masks_with_margin`` of ``toyworld_loss_landscape.py``, at pixel resolution; 4 px are 2 latent
cells of the toy model): the masked loss then also scores the cells just outside the object, where a larger
shape of the same colour would overflow.

Prints generations right (shape and colour) alone and jointly, overall and per shape, and the objects each
way drew better; writes ``--out`` (rows accumulate per object in ``--work``, so shards and sessions resume).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _paths  # noqa: F401  (sys.path: the repository root and benchmarks/)
import numpy as np
import torch
from toyworld_inversion_probe import learn_one, score
from toyworld_loss_landscape import loss_masks_with_margin

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.atomic import atomic_file
from diffusers_conceptexpress.evaluation import read_samples
from diffusers_conceptexpress.toyworld import model_path, render_scene
from diffusers_conceptexpress.toyworld.scenes import SHAPES
from toyworld import (  # benchmarks/toyworld.py
    add_world_arguments,
    generation_key,
    model_fingerprint,
    scenes,
    world_options,
)


def learning_mask(scene, k: int, grow: int) -> np.ndarray:
    """(H, W) bool: object ``k``'s visible mask, grown by ``grow`` pixels that no other object holds."""
    if not grow:
        return scene.masks[k]
    return loss_masks_with_margin(torch.from_numpy(np.stack(scene.masks)), grow)[k].numpy()


def learn_alone(pipe, seed: int, n: int, k: int, args, work: Path) -> dict:
    """Object ``k`` of benchmark scene ``seed`` learned alone; its row (cached in ``work``)."""
    folder = work / f"{seed}_{k}"
    row_path = folder / "row.json"
    if row_path.is_file():
        return json.loads(row_path.read_text())
    scene = render_scene(seed, num_objects=n, keep=[k] if args.isolate else None, **world_options(args))
    obj = scene.objects[k]
    folder.mkdir(parents=True, exist_ok=True)
    seconds = learn_one(pipe, scene.image, learning_mask(scene, k, args.grow), folder, args)
    row = {
        "seed": seed,
        "object": k,
        "shape_name": obj["shape"],
        "texture": obj["texture"],
        "seconds": seconds,
        **score(read_samples(folder, "concept_1", args.samples), obj),
    }
    with atomic_file(row_path, "w") as handle:
        json.dump(row, handle, indent=1)
    return row


def summarize(rows: list[dict], joint: dict[tuple[int, int], dict], samples: int) -> dict:
    """Generations right alone and jointly (counts), overall and per shape, and paired objects better."""
    # (shape, right alone, right jointly) per object; a row's "both" is a share of its generations
    pairs = [
        (r["shape_name"], round(r["both"] * samples), joint[r["seed"], r["object"]]["both"]) for r in rows
    ]
    table = {}
    for group in ("all", *SHAPES):
        sel = [(a, j) for shape, a, j in pairs if group in ("all", shape)]
        if sel:
            table[group] = {
                "objects": len(sel),
                "generations": samples * len(sel),
                "alone": sum(a for a, _ in sel),
                "joint": sum(j for _, j in sel),
            }
    better = [a - j for _, a, j in pairs]
    table["objects better"] = {"alone": sum(b > 0 for b in better), "joint": sum(b < 0 for b in better)}
    return table


def as_reading(rows: list[dict], samples: int) -> dict[tuple[int, int], dict]:
    """Rows of this script (``both``: a share) as a baseline reading (``both``: generations) for summarize."""
    return {(r["seed"], r["object"]): {"both": round(r["both"] * samples)} for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--start", type=int, default=20000, help="first benchmark seed")
    p.add_argument("--scenes", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--inference-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shard", default="0/1", help="K/N: this process learns objects i with i %% N == K")
    p.add_argument("--model", default=None)
    add_world_arguments(p)
    p.add_argument("--joint", type=Path, default=Path("benchmarks/results/toyworld.json"))
    p.add_argument(
        "--work", type=Path, default=None, help="default: .benchmark-runs/alone/<fingerprint>/<protocol>"
    )
    p.add_argument("--out", type=Path, default=Path(".toyworld-runs/probes/toyworld_alone.json"))
    p.add_argument(
        "--isolate",
        action="store_true",
        help="learn each object from its scene with the other objects painted over by the background",
    )
    p.add_argument(
        "--grow",
        type=int,
        default=0,
        help="learn from the object's mask grown by this many pixels that no other object holds (a diagnostic)",
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="an earlier --out of this script: compare with its rows instead of the benchmark's joint reading",
    )
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fingerprint = model_fingerprint(args.model or model_path(), world_options(args))
    protocol = generation_key(args)
    args.work = args.work or Path(".benchmark-runs/alone") / fingerprint / (
        protocol + ("-isolated" if args.isolate else "") + (f"-grow{args.grow}" if args.grow else "")
    )
    summary = json.loads(args.joint.read_text())
    if summary["header"].get("generation") != protocol:
        raise SystemExit(
            f"{args.joint} was generated with {summary['header'].get('generation')}, not {protocol}."
        )
    if summary["header"].get("fingerprint") != fingerprint:
        raise SystemExit(f"{args.joint} measured another model or world than {fingerprint}.")
    # the benchmark's object counts: they follow a scene's index from ITS first seed
    first, last = (int(x) for x in summary["header"]["seeds"].split("-"))
    if not first <= args.start <= args.start + args.scenes - 1 <= last:
        raise SystemExit(f"--start/--scenes must lie in the benchmark's seeds {first}-{last}.")
    items = scenes(last - first + 1, first)[args.start - first : args.start - first + args.scenes]
    objects = [(seed, n, k) for seed, n in items for k in range(n)]
    shard, shards = (int(x) for x in args.shard.split("/"))
    pipe = None if args.summarize_only else ConceptExpressPipeline.from_pretrained(args.model or model_path())
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)
    rows = []
    for i, (seed, n, k) in enumerate(objects):
        cached = args.work / f"{seed}_{k}" / "row.json"
        if args.summarize_only or i % shards != shard:
            if cached.is_file():
                rows.append(json.loads(cached.read_text()))
            continue
        rows.append(learn_alone(pipe, seed, n, k, args, args.work))
        print(f"[alone] object {i + 1}/{len(objects)} (seed {seed}, object {k}) done", flush=True)
    if not args.summarize_only:
        return
    missing = len(objects) - len(rows)
    if missing:
        raise SystemExit(f"{missing} object(s) not learned yet: run the shards first (--shard K/N).")
    if args.baseline:  # the same objects learned another way by this script (e.g. in the scene vs --isolate)
        joint = as_reading(json.loads(args.baseline.read_text())["rows"], args.samples)
        label = f"right in {args.baseline.name}"
    else:
        joint = {(r["seed"], r["target"]): r for r in summary["extraction"]["fast, GT masks"]["per_concept"]}
        label = "right jointly (the benchmark's fast, GT masks)"
    table = summarize(rows, joint, args.samples)
    mine = (
        "right alone"
        + (", isolated" if args.isolate else "")
        + (f", mask +{args.grow} px" if args.grow else "")
    )
    print(f"| objects | generations | {mine} | {label} |")
    print("|---|---|---|---|")
    for group, t in table.items():
        if group != "objects better":
            g = t["generations"]
            print(
                f"| {group} | {g} | {t['alone']} ({t['alone'] / g:.0%}) | {t['joint']} ({t['joint'] / g:.0%}) |"
            )
    print(
        f"\nobjects better: {mine} {table['objects better']['alone']}, {label} {table['objects better']['joint']}"
    )
    with atomic_file(args.out, "w") as handle:
        json.dump(
            {"args": {k: str(v) for k, v in vars(args).items()}, "table": table, "rows": rows},
            handle,
            indent=1,
        )


if __name__ == "__main__":
    main()
