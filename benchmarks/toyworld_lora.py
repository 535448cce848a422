"""The identity boost on the toy world: tokens alone against tokens + LoRA, and what the LoRA does to the model.

    python benchmarks/toyworld_lora.py --seed-start 50000 --scenes 20 [--lora-rank 4] [--threads 1] [--claim]

On ``--scenes`` toy scenes (seeds ``--seed-start`` + i, 2 objects for even i and 3 for odd i, as
``benchmarks/toyworld.py``), our masks, the fast schedule, extraction seed ``--seed``, ONE extraction per scene
with the LoRA phase (``extract_concepts(..., lora_rank=R)``); its token phase is exactly the extraction without
the LoRA phase (``ConceptLora.token_embeddings``), so both variants come from the same run:

1. **identity**: 4 generations per concept (DDIM 50, guidance 7.5, seeds 0-3, as ``benchmarks/toyworld.py``)
   with the token phase's embeddings alone and with the final embeddings and the LoRA, read by the toy
   classifier: the share that draws the concept's object (shape and colour; the object its mask is matched
   to, an unmatched concept counts as wrong).
2. **editability**, with the scene's LoRA and tokens loaded: every plain prompt "a photo of a <colour> <shape>"
   (8 colours x 6 shapes, 2 images each, seeds 0-1) read by the classifier, against the same prompts on the
   base model (generated once per run); and "a photo of <ce>_k and a <colour> <shape>" for each concept with a
   pair of a colour absent from the scene (drawn from the scene's seed), 2 images, where the named object is
   read by :func:`read_named_object` (the largest blob of the named colour, cut out onto grey and classified;
   :func:`reader_accuracy` measures that reader on clean renders).
3. **cost**: the extraction's seconds and the token phase's (the callback's time at the last token step), in
   the same run: ``cost_ratio`` = whole / token phase (localization included in both).

A run resumes: every scene's result is one JSON file under ``--work``/<fingerprint>/<options and protocol>/;
``--claim`` lets several processes share the scenes (research/recipes/toyworld_lora_gpu.sh). The summary
(printed, and ``--out``) holds both variants on the scenes done, the editability shares and the cost ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from diffusers_conceptexpress import ConceptExpressOutput, ConceptExpressPipeline
from diffusers_conceptexpress.toyworld import COLORS, SHAPES, classify, model_path, render_scene
from diffusers_conceptexpress.toyworld.scenes import PALETTE

sys.path.insert(0, str(Path(__file__).resolve().parent))
import toyworld

PLAIN_SAMPLES = 2


def plain_prompts() -> list[tuple[str, str]]:
    """Every (colour, shape) pair of the toy world, colour-major."""
    return [(c, s) for c in COLORS for s in SHAPES]


def generate_prompts(pipe, prompts: list[str], samples: int, args) -> list[PIL.Image.Image]:
    """``samples`` images of each prompt in ONE pipeline call, prompt-major; image i of a prompt has seed
    ``args.seed`` + i (the benchmark's protocol: one generator per image), whatever the other prompts."""
    return pipe(
        prompts,
        num_images_per_prompt=samples,
        num_inference_steps=args.inference_steps,
        guidance_scale=args.guidance,
        generator=[torch.Generator().manual_seed(args.seed + i) for _ in prompts for i in range(samples)],
    ).images


def generate(pipe, prompt: str, samples: int, args) -> list[PIL.Image.Image]:
    """``samples`` images of ``prompt`` with seeds ``args.seed``.. (:func:`generate_prompts` of one prompt)."""
    return generate_prompts(pipe, [prompt], samples, args)


def read_singles(images: list[list[PIL.Image.Image]], targets: list, scene) -> list[dict]:
    """Per concept: generations read right (shape and colour of its target object; no target: all wrong)."""
    rows = []
    for k, imgs in enumerate(images):
        truth = scene.objects[targets[k]] if targets[k] is not None else {}
        reads = classify(imgs)
        both = [r["shape"] == truth.get("shape") and r["color"] == truth.get("color") for r in reads]
        rows.append({
            "concept": k, "target": targets[k], "object_shape": truth.get("shape"),
            "object_color": truth.get("color"), "images": len(reads), "both": sum(both),
            "read": [f"{r['color']} {r['shape']}" for r in reads],
        })  # fmt: skip
    return rows


def singles(pipe, tokens: list[str], args) -> list[list[PIL.Image.Image]]:
    """``args.samples`` generations of "a photo of <c_k>" per concept (its tokens loaded in ``pipe``)."""
    return [generate(pipe, f"a photo of {t}", args.samples, args) for t in tokens]


def read_plain(pipe, args, chunk: int = 12) -> dict:
    """Every plain prompt, ``PLAIN_SAMPLES`` images each (seeds ``args.seed``.., ``chunk`` prompts per pipeline
    call), read by the classifier: ``{"right", "images", "wrong"}``."""
    pairs = plain_prompts()
    right, wrong, total = 0, [], 0
    for start in range(0, len(pairs), chunk):
        part = pairs[start : start + chunk]
        images = generate_prompts(pipe, [f"a photo of a {c} {s}" for c, s in part], PLAIN_SAMPLES, args)
        for j, r in enumerate(classify(images)):
            colour, shape = part[j // PLAIN_SAMPLES]
            total += 1
            if r["shape"] == shape and r["color"] == colour:
                right += 1
            else:
                wrong.append(f"{colour} {shape} -> {r['color']} {r['shape']}")
    return {"right": right, "images": total, "wrong": wrong}


def read_named_object(image: PIL.Image.Image, colour: str, shape: str, tolerance: float = 100.0) -> bool:
    """Whether ``image`` holds a ``colour`` ``shape`` among other things: the largest 4-connected blob of pixels
    whose nearest palette colour is ``colour`` (within ``tolerance``, RGB distance) is cut out onto grey and read
    by the classifier.

    An approximate reader of one named object in a picture of several (the classifier reads the main object
    only); :func:`reader_accuracy` measures it on clean renders.
    """
    from scipy import ndimage

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = np.asarray(list(PALETTE.values()), dtype=np.float32)
    dist = np.linalg.norm(rgb[:, :, None] - palette, axis=-1)  # (H, W, colours)
    near = (dist.argmin(-1) == list(PALETTE).index(colour)) & (dist.min(-1) < tolerance)
    labels, count = ndimage.label(near)
    if count == 0:
        return False
    sizes = ndimage.sum(near, labels, range(1, count + 1))
    blob = labels == 1 + int(np.argmax(sizes))
    if blob.sum() < 0.02 * blob.size:
        return False
    # the object's stripes and rim are darker than its colour: close, fill and widen the blob over them
    blob = ndimage.binary_fill_holes(ndimage.binary_closing(blob, iterations=2) | blob)
    blob = ndimage.binary_dilation(blob, iterations=2)
    cut = np.where(blob[..., None], rgb, 127.0).astype(np.uint8)
    read = classify([PIL.Image.fromarray(cut)])[0]
    return read["shape"] == shape and read["color"] == colour


def reader_accuracy(scenes: int = 100, start: int = 90_000) -> float:
    """Share of the objects of clean 2-3-object renders (seeds ``start`` + i) that :func:`read_named_object`
    finds by their colour and shape (objects whose colour another object of the scene shares are skipped)."""
    found = total = 0
    for i in range(scenes):
        scene = render_scene(start + i, num_objects=2 + i % 2)
        colours = [o["color"] for o in scene.objects]
        for o in scene.objects:
            if colours.count(o["color"]) == 1:
                total += 1
                found += read_named_object(scene.image, o["color"], o["shape"])
    return found / max(total, 1)


def composition_pairs(scene, seed: int, k: int) -> list[tuple[str, str]]:
    """One (colour, shape) per concept, absent from the scene and of a colour no object of it has, drawn from
    ``seed``: the "<ce>_k and a <colour> <shape>" prompts."""
    used = {o["color"] for o in scene.objects}
    pool = [(c, s) for c, s in plain_prompts() if c not in used]
    rng = np.random.default_rng(seed)
    return [pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)]


def read_compositions(pipe, tokens: list[str], scene, seed: int, args) -> dict:
    """ "a photo of <c_k> and a <colour> <shape>", ``PLAIN_SAMPLES`` images per concept: named object found."""
    found, total, rows = 0, 0, []
    for token, (colour, shape) in zip(tokens, composition_pairs(scene, seed, len(tokens)), strict=True):
        images = generate(pipe, f"a photo of {token} and a {colour} {shape}", PLAIN_SAMPLES, args)
        hits = [read_named_object(im, colour, shape) for im in images]
        found += sum(hits)
        total += len(hits)
        rows.append({"token": token, "named": f"{colour} {shape}", "found": sum(hits), "images": len(hits)})
    return {"found": found, "images": total, "per_concept": rows}


# ----------------------------------------------------------------------------------------------- the run
def lora_options(args) -> dict:
    """The LoRA phase's options of this run (``LearningConfig`` fields; the package's defaults unless given)."""
    opts = {"lora_rank": args.lora_rank}
    for name in (
        "lora_alpha",
        "lora_steps",
        "lora_learning_rate",
        "lora_token_learning_rate",
        "lora_prompts",
    ):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    return opts


def run_key(args) -> str:
    """The folder of this run's results: other options or generation settings are never mixed in."""
    opts = "-".join(f"{k.removeprefix('lora_')}{v}" for k, v in sorted(lora_options(args).items()))
    return f"{opts}_{toyworld.generation_key(args)}"


def run_scene(pipe, seed: int, n: int, args, work: Path) -> dict:
    """One extraction with the LoRA phase (its token phase is the extraction without it), both variants' single
    reads, the token phase's and the whole extraction's seconds, and the editability reads; cached."""
    path = work / run_key(args) / f"{seed}.json"
    if path.is_file() and (json.loads(path.read_text())["plain"] is not None or not args.editability):
        return json.loads(path.read_text())
    scene = render_scene(seed, num_objects=n, **toyworld.world_options(args))
    marks = {}

    def timer(step, total, logs):
        if step == args.steps - 1:
            marks["tokens"] = time.perf_counter()

    t0 = time.perf_counter()
    out = pipe.extract_concepts(
        scene.image,
        num_train_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
        callback=timer,
        load=False,
        **lora_options(args),
    )
    seconds = time.perf_counter() - t0
    masks = [np.asarray(m, dtype=bool) for m in out.localization.masks]
    matches = toyworld.mask_metrics(scene.masks, masks).matches
    targets = [next((g for g, p, _ in matches if p == j), None) for j in range(len(masks))]
    alone = ConceptExpressOutput(out.tokens, out.lora.token_embeddings, out.localization)
    pipe.load_concepts(alone)
    try:
        tokens_rows = read_singles(singles(pipe, out.tokens, args), targets, scene)
    finally:
        pipe.unload_concepts(alone)
    pipe.load_concepts(out)
    try:
        lora_rows = read_singles(singles(pipe, out.tokens, args), targets, scene)
        plain = read_plain(pipe, args) if args.editability else None
        composed = read_compositions(pipe, out.tokens, scene, seed, args) if args.editability else None
    finally:
        pipe.unload_concepts(out)
    if args.keep:
        out.save(work / run_key(args) / "concepts" / str(seed), overwrite=True)
    result = {
        "seed": seed, "objects": n, "concepts": len(masks), "targets": targets, "seconds": seconds,
        "seconds_token_phase": marks["tokens"] - t0, "threads": torch.get_num_threads(),
        "device": str(pipe.device), "options": lora_options(args), "tokens_alone": tokens_rows,
        "with_lora": lora_rows, "plain": plain, "composition": composed,
    }  # fmt: skip
    toyworld._write_json(path, result)
    return result


def base_plain(pipe, args, work: Path) -> dict:
    """The plain prompts on the base model (once per generation protocol)."""
    path = work / f"base_plain_{toyworld.generation_key(args)}.json"
    if not path.is_file():
        toyworld._write_json(path, read_plain(pipe, args))
    return json.loads(path.read_text())


def plain_misses_by_shape(plain: list[dict]) -> dict[str, int]:
    """Plain-prompt images read wrong, by the shape the prompt asked for (over :func:`read_plain` results)."""
    asked = [w.split(" -> ")[0].split()[-1] for x in plain for w in x["wrong"]]
    return {shape: asked.count(shape) for shape in SHAPES}


def share(rows: list[dict]) -> float:
    """Share of generations read right over rows of :func:`read_singles`."""
    return sum(r["both"] for r in rows) / max(sum(r["images"] for r in rows), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped toy model)")
    p.add_argument("--scenes", type=int, default=20)
    p.add_argument("--seed-start", type=int, default=50_000)
    p.add_argument(
        "--seed", type=int, default=0, help="extraction seed and first generation seed (as toyworld.py)"
    )
    p.add_argument("--steps", type=int, default=500, help="token-phase steps (authors: 500)")
    p.add_argument("--samples", type=int, default=4, help="generations per concept")
    p.add_argument("--inference-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-steps", type=int, default=None)
    p.add_argument("--lora-learning-rate", type=float, default=None)
    p.add_argument("--lora-token-learning-rate", type=float, default=None)
    p.add_argument("--lora-prompts", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--claim", action="store_true", help="share the scenes with other processes of the same --work"
    )
    p.add_argument(
        "--summarize-only", action="store_true", help="extract nothing; summarise the cached scenes"
    )
    p.add_argument(
        "--keep", action="store_true", help="also save each scene's concepts folder (with its LoRA)"
    )
    p.add_argument(
        "--no-editability",
        dest="editability",
        action="store_false",
        help="skip the plain and composition prompts (identity and cost only; e.g. the CPU cost measurement)",
    )
    p.add_argument("--work", default=".benchmark-runs/toyworld_lora", help="results per scene (not in git)")
    p.add_argument("--out", default=None, help="summary JSON (default: none)")
    toyworld.add_world_arguments(p)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = args.model or model_path()
    work = Path(args.work) / toyworld.model_fingerprint(model, toyworld.world_options(args))
    items = toyworld.scenes(args.scenes, args.seed_start)
    if not args.summarize_only:
        pipe = ConceptExpressPipeline.from_pretrained(model).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        claimed = not args.claim or toyworld.claim(
            work / "claims" / f"base_plain_{toyworld.generation_key(args)}"
        )
        if args.editability and claimed:
            base_plain(pipe, args, work)
        for seed, n in items:
            if args.claim and not toyworld.claim(work / "claims" / run_key(args) / str(seed)):
                continue
            r = run_scene(pipe, seed, n, args, work)
            print(
                f"scene {seed}: tokens alone {share(r['tokens_alone']):.0%}, with LoRA {share(r['with_lora']):.0%}; "
                f"{r['seconds']:.0f} s ({r['seconds_token_phase']:.0f} s token phase)",
                file=sys.stderr,
            )
    summary = summarize(items, args, work)
    print(json.dumps({k: v for k, v in summary.items() if k != "per_scene"}, indent=2))
    if args.out:
        toyworld._write_json(Path(args.out), summary)


def summarize(items, args, work: Path) -> dict:
    """Both variants on the scenes done, the editability shares and the cost ratio."""
    rows = [
        json.loads(f.read_text())
        for seed, _ in items
        if (f := work / run_key(args) / f"{seed}.json").is_file()
    ]
    base = work / f"base_plain_{toyworld.generation_key(args)}.json"
    base = json.loads(base.read_text()) if base.is_file() else None
    plain = [r["plain"] for r in rows if r["plain"] is not None]
    comp = [r["composition"] for r in rows if r["composition"] is not None]
    return {
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/toyworld_lora.py " + " ".join(sys.argv[1:]),
        "scenes": len(rows),
        "seeds": [r["seed"] for r in rows],
        "tokens_alone": share([c for r in rows for c in r["tokens_alone"]]),
        "with_lora": share([c for r in rows for c in r["with_lora"]]),
        "generations": sum(c["images"] for r in rows for c in r["with_lora"]),
        "editability_scenes": len(plain),
        "plain_with_lora": sum(x["right"] for x in plain) / sum(x["images"] for x in plain)
        if plain
        else None,
        "plain_base": base["right"] / base["images"] if base else None,
        "composition_named_object": sum(x["found"] for x in comp) / sum(x["images"] for x in comp)
        if comp
        else None,
        "scenes_helped": sum(share(r["with_lora"]) > share(r["tokens_alone"]) for r in rows),
        "scenes_hurt": sum(share(r["with_lora"]) < share(r["tokens_alone"]) for r in rows),
        "plain_wrong_by_shape": plain_misses_by_shape(plain),
        "seconds": float(np.mean([r["seconds"] for r in rows])) if rows else None,
        "seconds_range": [min(r["seconds"] for r in rows), max(r["seconds"] for r in rows)] if rows else None,
        "seconds_token_phase_range": [
            min(r["seconds_token_phase"] for r in rows),
            max(r["seconds_token_phase"] for r in rows),
        ]
        if rows
        else None,
        "cost_ratio": float(np.mean([r["seconds"] / r["seconds_token_phase"] for r in rows]))
        if rows
        else None,
        "options": lora_options(args),
        "generation": toyworld.generation_key(args),
        "per_scene": rows,
    }


if __name__ == "__main__":
    main()
