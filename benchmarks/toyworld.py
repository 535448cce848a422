"""The quality benchmark on the toy world: localization against ground truth, and extraction quality.

    python benchmarks/toyworld.py [--scenes 50] [--parts localization,extraction] [--threads 2] [--update-docs]

On ``--scenes`` fresh toy scenes (seeds 20,000 + i, 2 objects for even i and 3 for odd i) with the shipped
toy model (or ``--model``):

1. **localization** with "conceptexpress" (published defaults), plain "finch" and "kmeans" given the true
   number of objects (K = objects, and K = objects + 1 where the background gets its own cluster): mIoU
   (Hungarian-matched at image resolution, a missed object counts 0), precision and recall at IoU 0.5, the
   exact-count rate, and seconds per image. ``--pictures N`` writes one PNG of the first N scenes side by
   side (source, K-means, FINCH, ours, ground truth) to ``docs/toyworld_localizers.png``.
2. **extraction** with ``schedule="fast"`` and ``schedule="faithful"`` (and ``"turbo"``, asked for by name in
   ``--variants``), each with our masks and with the
   ground-truth masks (``masks=``): SIM^I, SIM^C, ACC^1, ACC^3 with the toy encoder, the share of
   single-concept generations whose main object ``toyworld.classify`` reads as the ground-truth object of
   that concept (shape and colour, and each of them alone; with our masks, the object the concept's mask
   matches, an unmatched concept counts as wrong), seconds per image and UNet sample-passes per image.
   The generations follow the method's protocol (docs/evaluation.md: DDIM 50 steps, guidance 7.5; ``--samples``
   4 per prompt, seeds ``--seed`` + i); tables before session 15 used DDIM 25 and guidance 5.

Each finished extraction is recorded under ``--records`` (default ``benchmarks/results/toyworld_extraction``;
one sub-folder per model and world, named by a hash of the weights and ``WORLD_VERSION``): its result, masks,
learned embeddings and its generations tiled in one PNG per generation protocol (``samples_<protocol>.png``,
a row per prompt). What git holds is one zip per variant (``<variant>.zip``, written by ``--pack``); a run
unpacks what its folders lack first, so a fresh clone summarises without the model. The generated images go
to ``--work`` (default ``.benchmark-runs/toyworld``, not in git; one sub-folder per generation protocol),
unpacked from that PNG or, for records without one, regenerated from the embeddings. So an interrupted run
resumes where it stopped, also in a later session; ``--shard K/N`` splits the scenes over parallel processes
(or ``--claim``: processes started with the same command take the scenes one at a time) and
``--summarize-only`` tabulates the scenes whose every variant is recorded. The summary goes to ``--out`` (default ``benchmarks/results/toyworld.json``; worker
runs, with ``--claim`` or a shard, write none unless ``--out`` is given) and, with ``--update-docs``, into
docs/benchmarks.md between the ``toyworld-benchmark`` markers.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from safetensors.torch import load_file, save

from diffusers_conceptexpress import ConceptExpressOutput, ConceptExpressPipeline
from diffusers_conceptexpress.atomic import atomic_file
from diffusers_conceptexpress.evaluation import (
    ConceptSet,
    ToyImageEncoder,
    evaluate_concepts,
    generate_samples,
    mask_metrics,
    read_samples,
)
from diffusers_conceptexpress.tokens import concept_token_names
from diffusers_conceptexpress.toyworld import classify, model_path, render_scene
from diffusers_conceptexpress.toyworld.classify import classifier_path
from diffusers_conceptexpress.toyworld.scenes import RIM_WIDTH, SHAPES, STRIPE_SHADE, TEXTURES
from diffusers_conceptexpress.visualize import image_grid, overlay_masks

LOCALIZERS = ("kmeans (K = objects)", "kmeans (K = objects + 1)", "finch", "conceptexpress")
VARIANTS = (
    "fast, our masks",
    "fast, GT masks",
    "faithful, our masks",
    "faithful, GT masks",
    "turbo, our masks",
    "turbo, GT masks",
)
#: What ``--variants`` asks for when it is not given (turbo's are asked for by name).
DEFAULT_VARIANTS = VARIANTS[:4]
START, END = "<!-- toyworld-benchmark:start -->", "<!-- toyworld-benchmark:end -->"


#: ``world_options``' values that render the shipped world's scenes
WORLD_DEFAULTS = {"rim": RIM_WIDTH, "radius_range": None, "stripe_shade": STRIPE_SHADE}


#: the world every fingerprint is keyed against: the third world (``WORLD_VERSION`` 3, stripes at 0.55). A
#: record's key names the options it was rendered with, not the defaults of the day, so the records made before
#: the fourth world became the default (session 14: ``STRIPE_SHADE`` 0.55 -> 0.8, pixels otherwise the same)
#: keep their keys: the fourth world is "world 3, stripe_shade 0.8", as the tenth-run trial's records were made
FINGERPRINT_WORLD = ("world 3", {"rim": 2, "radius_range": None, "stripe_shade": 0.55})


def world_changes(world: dict | None, defaults: dict | None = None) -> dict:
    """The options of ``world`` (``world_options``) that differ from ``defaults`` (the shipped world's), sorted by
    name; options ``world`` leaves out are the shipped world's."""
    resolved = WORLD_DEFAULTS | (world or {})
    base = WORLD_DEFAULTS if defaults is None else defaults
    return {k: v for k, v in sorted(resolved.items()) if v != base.get(k)}


def model_fingerprint(model: str, world: dict | None = None) -> str:
    """First 12 hex digits of the SHA-256 of the weights of a local diffusers folder and the scenes' world.

    Results of other weights, or of scenes rendered with other ``world`` options (``world_options``; the shipped
    world's where left out), never mix. The world enters as its differences from ``FINGERPRINT_WORLD``.
    """
    import hashlib

    name, base = FINGERPRINT_WORLD
    digest = hashlib.sha256(name.encode())
    for key, value in world_changes(world, base).items():
        digest.update(f" {key} {value}".encode())
    for part in ("unet", "text_encoder", "vae"):
        for f in sorted((Path(model) / part).glob("*.safetensors")):
            digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def classifier_fingerprint() -> str:
    """First 12 hex digits of the SHA-256 of the shipped toy classifier's weights.

    The classifier is the benchmark's instrument: ``classify`` reads the generations' shape and colour, and its
    features are the toy encoder of SIM and ACC. Tables read by different classifiers do not compare.
    """
    import hashlib

    return hashlib.sha256((classifier_path() / "model.safetensors").read_bytes()).hexdigest()[:12]


@functools.cache
def code_version() -> str | None:
    """The git commit the benchmark runs on (``+dirty`` with uncommitted changes), for the records' timings.

    Read once per process (``main`` reads it at start), so a commit made while a long run goes on does not
    relabel the records the running code writes.
    """
    try:
        run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, check=True).stdout  # noqa: E731
        return run("rev-parse", "--short=12", "HEAD").strip() + (
            "+dirty" if run("status", "--porcelain", "-uno") else ""
        )
    except (OSError, subprocess.CalledProcessError):
        return None


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    """``--rim``, ``--stripe-shade`` and ``--radius-range``: the toy-world options of the benchmark scripts that
    render scenes."""
    parser.add_argument(
        "--rim", type=int, default=RIM_WIDTH, help="render_scene's rim (0: the second world, no rims)"
    )
    parser.add_argument(
        "--stripe-shade",
        type=float,
        default=STRIPE_SHADE,
        help="render_scene's stripe_shade (dark bands' share)",
    )
    parser.add_argument(
        "--radius-range",
        type=float,
        nargs=2,
        default=None,
        help="object radii of the 2-3-object scenes, px (default: the world's; 10 15 = the first world's)",
    )


def world_options(args: argparse.Namespace) -> dict:
    """``render_scene``'s keyword arguments from ``add_world_arguments``' options (also written to the JSON)."""
    return {
        "radius_range": tuple(args.radius_range) if args.radius_range else None,
        "rim": args.rim,
        "stripe_shade": args.stripe_shade,
    }


def scenes(n: int, start: int) -> list[tuple[int, int]]:
    return [(start + i, 2 + i % 2) for i in range(n)]


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path, "w") as handle:
        handle.write(json.dumps(data, indent=2))


def localizer_options(name: str, num_objects: int) -> dict:
    if name.startswith("kmeans"):
        return {"method": "kmeans", "num_concepts": num_objects + (1 if "+ 1" in name else 0)}
    return {"method": name}


def localize_scene(
    pipe, seed: int, num_objects: int, name: str, world=None
) -> tuple[list[np.ndarray], float]:
    scene = render_scene(seed, num_objects=num_objects, **(world or {}))
    t0 = time.perf_counter()
    res = pipe.localize_concepts(
        scene.image, generator=torch.Generator().manual_seed(0), **localizer_options(name, num_objects)
    )
    return [np.asarray(m, dtype=bool) for m in res.masks], time.perf_counter() - t0


# ----------------------------------------------------------------------------- 1. localization
def run_localization(pipe, items, work: Path, world=None) -> dict:
    rows = {name: [] for name in LOCALIZERS}
    for i, (seed, n) in enumerate(items):
        path = work / "localization" / f"{seed}.json"
        if path.is_file():
            cached = json.loads(path.read_text())
        else:
            scene = render_scene(seed, num_objects=n, **(world or {}))
            cached = {}
            for name in LOCALIZERS:
                masks, seconds = localize_scene(pipe, seed, n, name, world)
                m = mask_metrics(scene.masks, masks)
                cached[name] = {**m.to_dict(), "count": len(masks), "objects": n, "seconds": seconds}
            _write_json(path, cached)
        for name in LOCALIZERS:
            rows[name].append(cached[name])
        print(f"[localization] scene {i + 1}/{len(items)} (seed {seed}) done", file=sys.stderr)
    summary = {}
    for name, r in rows.items():
        summary[name] = {
            "miou": float(np.mean([x["miou"] for x in r])),
            "precision": float(np.mean([x["precision"] for x in r])),
            "recall": float(np.mean([x["recall"] for x in r])),
            "exact_count": float(np.mean([x["count_error"] == 0 for x in r])),
            "mean_count_error": float(np.mean([x["count_error"] for x in r])),
            "seconds": float(np.mean([x["seconds"] for x in r])),
            "scenes": len(r),
        }
    return summary


def localizer_pictures(pipe, items, out: Path, world=None) -> None:
    """Source, K-means (K = objects), FINCH, ours and the ground truth, one row per scene, enlarged x4."""
    tiles, captions = [], []
    shown = ("kmeans (K = objects)", "finch", "conceptexpress")
    for seed, n in items:
        scene = render_scene(seed, num_objects=n, **(world or {}))
        tiles.append(scene.image)
        captions.append(f"scene {seed}")
        for name in shown:
            masks, _ = localize_scene(pipe, seed, n, name, world)
            pil = [PIL.Image.fromarray(m.astype(np.uint8) * 255) for m in masks]
            tiles.append(overlay_masks(scene.image, pil))
            captions.append({"kmeans (K = objects)": "K-means (true K)", "finch": "FINCH"}.get(name, "ours"))
        gt = [PIL.Image.fromarray(m.astype(np.uint8) * 255) for m in scene.masks]
        tiles.append(overlay_masks(scene.image, gt))
        captions.append("ground truth")
    grid = image_grid(tiles, captions, columns=len(shown) + 2)
    with atomic_file(out) as handle:
        grid.save(handle, format="PNG")


# ----------------------------------------------------------------------------- 2. extraction
RECORDS = Path("benchmarks/results/toyworld_extraction")
OUT = Path("benchmarks/results/toyworld.json")


def _variant_dir(variant: str) -> str:
    return variant.replace(", ", "_").replace(" ", "-")


def _result_path(records: Path, variant: str, seed: int) -> Path:
    """The committed record of one extraction: ``result.json``, ``masks.npz``, ``embeddings.safetensors``."""
    return records / _variant_dir(variant) / str(seed) / "result.json"


def _archive_path(records: Path, variant: str) -> Path:
    """The committed form of one variant's records: ``records/<variant>.zip`` (one file instead of 4 per scene)."""
    return records / f"{_variant_dir(variant)}.zip"


#: every member of an archive gets this timestamp, so packing the same records gives the same bytes
_ZIP_TIME = (2026, 1, 1, 0, 0, 0)


def pack_records(records: Path, variant: str) -> Path | None:
    """Write ``records/<variant>/<seed>/*`` of every complete record (its ``result.json`` written) into
    ``records/<variant>.zip``, atomically and byte-reproducibly (sorted members, fixed timestamps).

    The folders are the working form (git ignores them); the archive is what is committed. Returns the
    archive's path, or None when the variant has no complete record.
    """
    folder = records / _variant_dir(variant)
    seeds = sorted((p.parent for p in folder.glob("*/result.json")), key=lambda p: (len(p.name), p.name))
    if not seeds:
        return None
    archive = _archive_path(records, variant)
    with atomic_file(archive, "wb") as handle, zipfile.ZipFile(handle, "w") as zf:
        for seed in seeds:
            for f in sorted(seed.iterdir()):
                info = zipfile.ZipInfo(f"{seed.name}/{f.name}", date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_STORED if f.suffix == ".png" else zipfile.ZIP_DEFLATED
                zf.writestr(info, f.read_bytes())
    return archive


def unpack_records(records: Path, variant: str) -> int:
    """Unpack the records of ``records/<variant>.zip`` that ``records/<variant>/`` lacks; returns how many.

    Each scene's folder is written to a temporary name of this process and renamed into place, ``result.json``
    last, so an interrupted unpack leaves no record that looks complete, and processes started together (the
    ``--claim`` workers of a recipe) may unpack the same archive at once: the first rename wins.
    """
    archive = _archive_path(records, variant)
    if not archive.is_file():
        return 0
    folder = records / _variant_dir(variant)
    added = 0
    with zipfile.ZipFile(archive) as zf:
        members: dict[str, list[zipfile.ZipInfo]] = {}
        for info in zf.infolist():
            members.setdefault(info.filename.split("/")[0], []).append(info)
        for seed, infos in members.items():
            if (folder / seed / "result.json").is_file():
                continue
            tmp = folder / f".{seed}.unpacking.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for info in sorted(infos, key=lambda i: i.filename.endswith("result.json")):
                (tmp / Path(info.filename).name).write_bytes(zf.read(info))
            if (folder / seed / "result.json").is_file():  # another process unpacked it meanwhile
                shutil.rmtree(tmp)
                continue
            shutil.rmtree(folder / seed, ignore_errors=True)  # a half record of an interrupted run
            try:
                os.replace(tmp, folder / seed)
            except OSError:  # another process's rename came first
                shutil.rmtree(tmp)
                if not (folder / seed / "result.json").is_file():
                    raise
                continue
            added += 1
    return added


def generation_key(args) -> str:
    """The folder name of one generation protocol: images made with other settings are never mixed in."""
    return f"ddim{args.inference_steps}-cfg{args.guidance:g}-n{args.samples}-seed{args.seed}"


def _samples_dir(work: Path, variant: str, seed: int, args) -> Path:
    return work / "extraction" / generation_key(args) / _variant_dir(variant) / str(seed)


def claim(path: Path) -> bool:
    """Take one unit of work for this process: False when another live process holds ``path``.

    The claim is a file created with ``O_EXCL`` holding the owner's pid; one whose process is gone (a killed
    run) is taken over. Processes started with the same ``--work`` and ``--claim`` so share the scenes one at a
    time, and none waits on a slower shard.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = int(path.read_text() or 0)
            os.kill(owner, 0)  # raises when no such process
        except (ValueError, ProcessLookupError, FileNotFoundError):
            path.unlink(missing_ok=True)  # a dead owner's claim
            return claim(path)
        except PermissionError:
            return False  # alive, another user's
        return owner == os.getpid()
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True


def _generate(pipe, tokens: list[str], embeddings: torch.Tensor, folder: Path, args) -> list[str]:
    """The evaluation images of one extraction (regenerated from its record when the cache lacks them)."""
    pipe.load_concepts(ConceptExpressOutput(tokens=tokens, embeddings=embeddings, localization=None))
    folder.mkdir(parents=True, exist_ok=True)
    return generate_samples(
        pipe, tokens, folder, samples=args.samples, seed=args.seed, steps=args.inference_steps,
        guidance=args.guidance,
    )  # fmt: skip


def sample_names(concepts: int) -> list[str]:
    """The file stems of one extraction's generations: ``concept_<k>`` (k = 1..K), then ``joint`` when K >= 2."""
    return [f"concept_{k + 1}" for k in range(concepts)] + (["joint"] if concepts > 1 else [])


def _samples_record(record: Path, args) -> Path:
    return record / f"samples_{generation_key(args)}.png"


def pack_samples(samples: Path, names: list[str], count: int, grid: Path) -> None:
    """Tile ``<samples>/<name>_<i>.png`` into one PNG (a row per name, a column per i), written atomically.

    Kept in the record, it makes a later session's summary exact and free (PNG is lossless) instead of
    costing about 1.5 minutes of generation per scene and variant on one thread (docs/benchmarks.md).
    """
    tiles = [
        [PIL.Image.open(samples / f"{name}_{i}.png").convert("RGB") for i in range(count)] for name in names
    ]
    w, h = tiles[0][0].size
    sheet = PIL.Image.new("RGB", (w * count, h * len(names)))
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile, (c * w, r * h))
    with atomic_file(grid, "wb") as handle:
        sheet.save(handle, format="PNG")


def unpack_samples(grid: Path, names: list[str], count: int, samples: Path) -> None:
    """The inverse of :func:`pack_samples`: write the tiles back as ``<samples>/<name>_<i>.png``."""
    sheet = PIL.Image.open(grid).convert("RGB")
    w, h = sheet.width // count, sheet.height // len(names)
    if (w * count, h * len(names)) != sheet.size:
        raise ValueError(f"{grid}: {sheet.size} is not a grid of {len(names)} x {count} equal tiles.")
    samples.mkdir(parents=True, exist_ok=True)
    for r, name in enumerate(names):
        for c in range(count):
            sheet.crop((c * w, r * h, (c + 1) * w, (r + 1) * h)).save(samples / f"{name}_{c}.png")


def extract_scene(pipe, seed: int, n: int, variant: str, args, records: Path, work: Path) -> dict:
    """One extraction + its generations.

    The record (small: result, masks, learned embeddings) goes to ``records/<variant>/<seed>/`` and is
    committed, so an interrupted benchmark resumes in a later session; the generated PNGs go to
    ``work/extraction/<generation protocol>/<variant>/<seed>/`` and are regenerated from the embeddings when missing.
    """
    result_path = _result_path(records, variant, seed)
    samples = _samples_dir(work, variant, seed, args)
    grid = _samples_record(result_path.parent, args)
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        names = sample_names(result["concepts"])
        if not (samples / "done").is_file():
            if grid.is_file():
                unpack_samples(grid, names, args.samples, samples)
            else:
                emb = load_file(str(result_path.parent / "embeddings.safetensors"))["embeddings"]
                _generate(pipe, concept_token_names("<ce>", emb.shape[0]), emb, samples, args)
            (samples / "done").touch()
        if not grid.is_file():
            pack_samples(samples, names, args.samples, grid)
        return result
    scene = render_scene(seed, num_objects=n, **world_options(args))
    schedule = variant.split(",")[0]
    gt = "GT" in variant
    t0 = time.perf_counter()
    out = pipe.extract_concepts(
        scene.image,
        num_train_steps=args.steps,
        schedule=schedule,
        masks=[m for m in scene.masks] if gt else None,
        generator=torch.Generator().manual_seed(args.seed),
        load=False,
    )
    seconds = time.perf_counter() - t0
    masks = [np.asarray(m, dtype=bool) for m in out.localization.masks]
    if gt:
        targets = list(range(n))
    else:
        matches = mask_metrics(scene.masks, masks).matches
        targets = [next((g for g, p, _ in matches if p == j), None) for j in range(len(masks))]
    prompts = _generate(pipe, out.tokens, out.embeddings, samples, args)
    (samples / "done").touch()
    result = {
        "seed": seed,
        "objects": n,
        "concepts": len(masks),
        "targets": targets,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "code": code_version(),
        "unet_samples": out.learning.num_unet_samples,
        "updates": out.learning.num_updates,
        "prompts": prompts,
    }
    folder = result_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / "masks.npz", "wb") as handle:
        np.savez_compressed(handle, *masks)
    with atomic_file(folder / "embeddings.safetensors", "wb") as handle:
        handle.write(save({"embeddings": out.embeddings.contiguous()}))
    pack_samples(samples, sample_names(len(masks)), args.samples, grid)
    _write_json(result_path, result)  # last: its presence marks a complete record
    return result


def right_by(per_concept: list[dict], key: str, values) -> dict:
    """Generations right per value of the target object's ``key`` ("texture", "object_shape").

    Returns ``{value: {"correct": generations right, "generations": generations}}``; concepts whose mask
    matched no object (``key`` None) are in no group.
    """
    return {
        v: {
            "correct": sum(r["both"] for r in per_concept if r.get(key) == v),
            "generations": sum(r["images"] for r in per_concept if r.get(key) == v),
        }
        for v in values
    }


def shape_confusion(per_concept: list[dict]) -> dict:
    """Generations per (object's shape, shape read in the generation): ``{true: {read: count}}``.

    The shapes a learned token draws instead of its object's say what the masked loss let it get away with
    (docs/toyworld.md). Rows of :func:`summarize_extraction` without ``read_shapes`` (older summaries) or
    without a target object count nowhere.
    """
    table = {true: dict.fromkeys(SHAPES, 0) for true in SHAPES}
    for r in per_concept:
        for read in r.get("read_shapes") or []:
            if r.get("object_shape") in table and read in table[r["object_shape"]]:
                table[r["object_shape"]][read] += 1
    return table


def colour_errors(per_concept: list[dict]) -> dict[str, int]:
    """Generations whose colour was read wrong, per "object's colour->colour read": ``{"orange->yellow": 14}``.

    A drift of the UNet's colours shows as one pair dominating (docs/toyworld.md, "Fourteenth run"). Rows
    without ``read_colors`` (older summaries) or without a target object count nowhere.
    """
    found: dict[str, int] = {}
    for r in per_concept:
        for read in r.get("read_colors") or []:
            if r.get("object_color") is not None and read != r["object_color"]:
                key = f"{r['object_color']}->{read}"
                found[key] = found.get(key, 0) + 1
    return dict(sorted(found.items(), key=lambda kv: (-kv[1], kv[0])))


def summarize_extraction(items, variant: str, args, records: Path, work: Path, encoder) -> dict:
    sets, seconds, samples = [], [], []
    per_concept = []  # one row per learned concept, for paired comparisons across models and variants
    for seed, n in items:
        result = json.loads(_result_path(records, variant, seed).read_text())
        folder = _samples_dir(work, variant, seed, args)
        scene = render_scene(seed, num_objects=n, **world_options(args))
        masks = list(np.load(_result_path(records, variant, seed).parent / "masks.npz").values())
        single = [read_samples(folder, f"concept_{k + 1}", args.samples) for k in range(len(masks))]
        joint = read_samples(folder, "joint", args.samples) if len(masks) > 1 else []
        sets.append(ConceptSet(scene.image, masks, single, joint, name=str(seed)))
        for k, images in enumerate(single):
            target = result["targets"][k]
            truth = scene.objects[target] if target is not None else {}
            reads = classify(images)
            shape = [r["shape"] == truth.get("shape") for r in reads]
            color = [r["color"] == truth.get("color") for r in reads]
            per_concept.append({
                "seed": seed, "concept": k, "target": target, "texture": truth.get("texture"),
                "object_shape": truth.get("shape"), "object_color": truth.get("color"), "images": len(reads), "both": sum(s and c for s, c in zip(shape, color, strict=True)),
                "shape": sum(shape), "color": sum(color), "read_shapes": [r["shape"] for r in reads],
                "read_colors": [r["color"] for r in reads],
            })  # fmt: skip
        seconds.append(result["seconds"])
        samples.append(result["unet_samples"])
    metrics = evaluate_concepts(sets, encoder)
    total = max(sum(r["images"] for r in per_concept), 1)
    return {
        "sim_i": metrics.sim_i,
        "sim_c": metrics.sim_c,
        "acc1": metrics.acc1,
        "acc3": metrics.acc3,
        "generation_correct": sum(r["both"] for r in per_concept) / total,
        "generation_shape": sum(r["shape"] for r in per_concept) / total,
        "generation_color": sum(r["color"] for r in per_concept) / total,
        "generations": sum(r["images"] for r in per_concept),
        "by_texture": right_by(per_concept, "texture", TEXTURES),  # striped objects are the hard ones
        "by_shape": right_by(per_concept, "object_shape", SHAPES),
        "shape_confusion": shape_confusion(per_concept),
        "colour_errors": colour_errors(per_concept),
        "seconds": float(np.mean(seconds)),
        "seconds_range": [float(min(seconds)), float(max(seconds))] if seconds else None,
        "unet_samples": float(np.mean(samples)),
        "scenes": len(items),
        "per_concept": per_concept,
    }


# ----------------------------------------------------------------------------- report
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table (and a blank line after it); nothing when there are no rows."""
    if not rows:
        return []
    return (
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(r) + " |" for r in rows]
        + [""]
    )


def _share(t: dict | None) -> str:
    """ "75% (68)": generations right (and their number) of one group of :func:`right_by`; "-" if empty."""
    return f"{t['correct'] / t['generations']:.0%} ({t['generations']})" if t and t["generations"] else "-"


def _by_texture(r: dict) -> str:
    """ "75% (68) / 12% (40)": generations right for plain and for striped target objects."""
    return " / ".join(_share(r.get("by_texture", {}).get(texture)) for texture in TEXTURES)


def markdown(summary: dict, header: dict) -> str:
    lines = [
        f"Command: `{header['command']}`  ",
        f"Date: {header['date']}; machine: {header['machine']}; model: {header['model']}; "
        f"classifier (generations' shape and colour, toy encoder): {header.get('classifier', 'first')}; "
        f"scenes: {header['scenes']} (seeds {header['seeds']}); "
        f"generations: {header.get('generation', 'ddim25-cfg5-n4-seed0')}.",
        "",
    ]
    loc = summary.get("localization") or {}
    lines += _table(
        ["localizer", "mIoU", "precision@0.5", "recall@0.5", "exact count", "mean count error", "s / image"],
        [
            [name, f"{r['miou']:.3f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['exact_count']:.0%}",
             f"{r['mean_count_error']:+.2f}", f"{r['seconds']:.2f}"]
            for name, r in loc.items()
        ],
    )  # fmt: skip
    ext = summary.get("extraction") or {}
    lines += _table(
        ["extraction", "SIM^I", "SIM^C", "ACC^1", "ACC^3", "generations correct", "shape / colour right",
         "plain / striped objects", "s / image", "UNet samples / image", "scenes"],
        [
            [name, f"{r['sim_i']:.3f}", "-" if r["sim_c"] is None else f"{r['sim_c']:.3f}", f"{r['acc1']:.3f}",
             f"{r['acc3']:.3f}", f"{r['generation_correct']:.0%} ({r['generations']})",
             f"{r.get('generation_shape', float('nan')):.0%} / {r.get('generation_color', float('nan')):.0%}",
             _by_texture(r),
             f"{r['seconds']:.0f}",
             f"{r['unet_samples']:.0f}", str(r["scenes"])]
            for name, r in ext.items()
        ],
    )  # fmt: skip
    lines += _table(
        ["generations right per object shape", *SHAPES],
        [[name, *(_share(r["by_shape"].get(shape)) for shape in SHAPES)] for name, r in ext.items() if "by_shape" in r],
    )  # fmt: skip
    for name, r in ext.items():
        if "shape_confusion" in r:
            lines += _table(
                [f"{name}: object's shape (row) / shape drawn", *SHAPES],
                [[true, *(str(r["shape_confusion"][true][read]) for read in SHAPES)] for true in SHAPES],
            )
    return "\n".join(lines)


def update_docs(path: Path, table: str) -> None:
    text = path.read_text()
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n## Toy-world quality benchmark\n\n" + block + "\n"
    with atomic_file(path, "w") as handle:
        handle.write(text)


def _wanted_variants(args) -> list[str]:
    """The names of :data:`VARIANTS` that ``--variants`` (their folder forms, comma-separated) asks for."""
    return [v for v in VARIANTS if _variant_dir(v) in args.variants.split(",")]


def _check_records_of(parser: argparse.ArgumentParser, args, parts: list[str], items) -> None:
    """``--records-of`` summarises committed records alone: no weights, so no scene may need the model."""
    if not args.summarize_only or parts != ["extraction"] or args.model is not None:
        parser.error("--records-of FINGERPRINT goes with --summarize-only --parts extraction and no --model")
    folder = Path(args.records) / args.records_of
    if not folder.is_dir():
        parser.error(
            f"--records-of: no records at {folder}; the fingerprints are the folders of {args.records}"
        )
    recorded = [_result_path(folder, v, seed) for seed, _ in items for v in _wanted_variants(args)]
    ungridded = [
        str(r.parent) for r in recorded if r.is_file() and not _samples_record(r.parent, args).is_file()
    ]
    if ungridded:
        parser.error(
            f"--records-of: {len(ungridded)} record(s) have no samples_{generation_key(args)}.png (e.g. "
            f"{ungridded[0]}); their images can only be made with the model's weights (--model)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped toy model)")
    p.add_argument("--scenes", type=int, default=50)
    p.add_argument("--seed-start", type=int, default=20_000)
    p.add_argument("--parts", default="localization,extraction")
    p.add_argument(
        "--variants",
        default=",".join(_variant_dir(v) for v in DEFAULT_VARIANTS),
        help=f"comma-separated, of {', '.join(_variant_dir(v) for v in VARIANTS)} (default: %(default)s)",
    )
    p.add_argument(
        "--extraction-scenes", type=int, default=None, help="only the first N scenes (default: all)"
    )
    p.add_argument(
        "--shard", default="0/1", help="K/N: extract only scenes i with i %% N == K (parallel processes)"
    )
    p.add_argument(
        "--claim",
        action="store_true",
        help="share the scenes with other processes of the same --work one at a time (claim files)",
    )
    p.add_argument(
        "--summarize-only",
        action="store_true",
        help="extract nothing; summarise the scenes whose every variant is in the cache",
    )
    p.add_argument(
        "--records-of",
        default=None,
        metavar="FINGERPRINT",
        help="with --summarize-only: summarise the committed records of that fingerprint without its weights "
        "(a trial's model that is gone); every scene needs its samples grid",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps per extraction (default: the schedule's; authors: 500)",
    )
    p.add_argument("--samples", type=int, default=4, help="generations per concept and for the joint prompt")
    p.add_argument(
        "--inference-steps",
        type=int,
        default=50,
        help="DDIM steps (the paper's protocol, docs/evaluation.md: 50)",
    )
    p.add_argument(
        "--guidance", type=float, default=7.5, help="classifier-free guidance (the paper's protocol: 7.5)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--device",
        default="cpu",
        help="where the pipeline runs (cpu, cuda); results on another device differ in the last bits",
    )
    p.add_argument("--pictures", type=int, default=6, help="scenes in docs/toyworld_localizers.png (0: none)")
    p.add_argument("--work", default=".benchmark-runs/toyworld", help="generated images (not in git)")
    p.add_argument(
        "--records", default=str(RECORDS), help="per-extraction records (committed; one folder per model)"
    )
    p.add_argument(
        "--out",
        default=None,
        help=f"summary JSON (default {OUT}; a worker run, --claim or a --shard other than 0/1, writes "
        "none unless given, so that it never replaces the committed summary with its part)",
    )
    p.add_argument("--update-docs", action="store_true", help="write the table into docs/benchmarks.md")
    p.add_argument(
        "--pack",
        action="store_true",
        help="at the end, write each variant's complete records into <records>/<fingerprint>/<variant>.zip "
        "(the committed form; the unpacked folders are git-ignored)",
    )
    add_world_arguments(p)
    args = p.parse_args()
    world = world_options(args)
    code_version()  # the commit this process runs, before anything is committed meanwhile
    torch.set_num_threads(args.threads)
    model = args.model or model_path()
    parts = args.parts.split(",")
    items = scenes(args.scenes, args.seed_start)
    fingerprint = args.records_of or model_fingerprint(model, world)  # hashes the weights once
    for variant in _wanted_variants(args) if "extraction" in parts else []:
        unpack_records(Path(args.records) / fingerprint, variant)
    if args.records_of is not None:
        _check_records_of(p, args, parts, items)
        pipe = None
    else:
        pipe = ConceptExpressPipeline.from_pretrained(model).to(args.device)
        pipe.set_progress_bar_config(disable=True)
    work = Path(args.work) / fingerprint  # caches of another model's weights are never mixed in
    records = Path(args.records) / fingerprint
    worker = args.claim or args.shard != "0/1"
    out = Path(args.out) if args.out else None if worker else Path(OUT)
    summary = json.loads(out.read_text()) if out is not None and out.is_file() else {}
    if summary.get("header", {}).get("fingerprint") != fingerprint:
        summary = {}  # parts measured on other weights must not sit in this model's table
    if "localization" in parts:
        summary["localization"] = run_localization(pipe, items, work, world)
        if args.pictures:
            localizer_pictures(pipe, items[: args.pictures], Path("docs/toyworld_localizers.png"), world)
    if "extraction" in parts:
        wanted = _wanted_variants(args)
        ext_items = items[: args.extraction_scenes] if args.extraction_scenes else items
        shard, shards = (int(v) for v in args.shard.split("/"))
        # scene-major, so that an interrupted run has every variant on the same scenes
        for i, (seed, n) in enumerate(ext_items):
            mine = not args.summarize_only and i % shards == shard
            for variant in wanted:
                if not (mine or (args.summarize_only and _result_path(records, variant, seed).is_file())):
                    continue  # --summarize-only regenerates recorded scenes' missing images, nothing else
                if args.claim and not claim(work / "claims" / _variant_dir(variant) / str(seed)):
                    continue  # another process has it
                r = extract_scene(pipe, seed, n, variant, args, records, work)
                print(
                    f"[{variant}] scene {i + 1}/{len(ext_items)} (seed {seed}): {r['concepts']} concept(s), "
                    f"{r['seconds']:.0f} s",
                    file=sys.stderr,
                )
        done = [it for it in ext_items if all(_result_path(records, v, it[0]).is_file() for v in wanted)]
        encoder = ToyImageEncoder()
        summary["extraction"] = {
            v: summarize_extraction(done, v, args, records, work, encoder) for v in wanted if done
        }
        if args.pack:
            for variant in wanted:
                print(f"packed {pack_records(records, variant)}", file=sys.stderr)
    cmd = "python benchmarks/toyworld.py " + " ".join(sys.argv[1:])
    header = {
        "command": cmd.strip(),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{args.threads} thread(s)" + (f", {args.device}" if args.device != "cpu" else ""),
        "model": args.model or (f"records of {args.records_of}" if args.records_of else "shipped toy model"),
        "fingerprint": fingerprint,
        "classifier": classifier_fingerprint(),
        "scenes": args.scenes,
        "seeds": f"{args.seed_start}-{args.seed_start + args.scenes - 1}",
        "generation": generation_key(args),
        **world_changes(world),
    }
    summary["header"] = header
    if out is not None:
        _write_json(out, summary)
    table = markdown(summary, header)
    print(table)
    if args.update_docs:
        update_docs(Path("docs/benchmarks.md"), table)


if __name__ == "__main__":
    main()
