"""Tune the LoRA phase cheaply: start it from the committed token-phase records of the TUNING scenes.

    python research/probes/toyworld_lora_tuning.py --seeds 20009,20013,20035,20047 \
        --config a:lora_learning_rate=1e-4 --config b:lora_learning_rate=5e-4 [--threads 1]

The token phase is deterministic and ``benchmarks/toyworld.py``'s "fast, our masks" records of the 50 tuning
scenes (seeds 20,000-20,049; ``benchmarks/results/toyworld_extraction/<fingerprint>/fast_our-masks.zip``) hold
each scene's learned embeddings. For each scene the probe localizes again (deterministic: the records' masks,
plus the soft feature maps the records do not keep), encodes the image and its flip, runs the LoRA phase
(:func:`diffusers_conceptexpress.lora.train_lora`) from the recorded embeddings with each ``--config``
(``name:field=value,...``, fields of ``LearningConfig``; ``lora_rank`` 4 unless given), then generates 4 images
per concept (DDIM 50, guidance 7.5, seeds 0-3) and reads them with the toy classifier as the benchmark does,
next to the record's own reads (tokens alone). A light editability check: 12 plain prompts ("a photo of a
<colour> <shape>", every 4th pair), one image each, with the LoRA loaded. One JSON line per (config, scene) to
``--out`` (appended; a rerun skips the pairs already there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _paths  # noqa: F401  (repository root and benchmarks/ on sys.path)
import torch
from safetensors.torch import load_file

import toyworld
import toyworld_lora
from diffusers_conceptexpress import (
    ConceptExpressOutput,
    ConceptExpressPipeline,
    LearnedConcepts,
    LearningConfig,
)
from diffusers_conceptexpress.image_io import prepare_image
from diffusers_conceptexpress.lora import train_lora
from diffusers_conceptexpress.tokens import concept_token_names
from diffusers_conceptexpress.toyworld import classify, model_path, render_scene

#: The light editability check: every 4th colour-shape pair (12 prompts), one image each.
PLAIN_PROMPTS = toyworld_lora.plain_prompts()[::4]


def parse_config(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    opts: dict = {"lora_rank": 4}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        opts[key] = (
            value
            if key == "lora_prompts"
            else (int(value) if key in ("lora_rank", "lora_steps") else float(value))
        )
    return name, opts


def scene_inputs(pipe, scene):
    """Localization (masks, features) and the latents of the image and its flip, as ``extract_concepts``."""
    loc = pipe.localize_concepts(scene.image, generator=torch.Generator().manual_seed(0))
    pixels, _ = prepare_image(
        scene.image, pipe.default_resolution, multiple=pipe.size_multiple, policy="squash"
    )
    with torch.no_grad():
        latents = pipe.encode_pixels(torch.cat([pixels, pixels.flip(-1)]))
    return loc, latents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="20009,20013,20035,20047")
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--out", default=".toyworld-runs/probes/toyworld_lora_tuning.jsonl")
    args = p.parse_args()
    args.inference_steps, args.guidance, args.seed = 50, 7.5, 0
    torch.set_num_threads(args.threads)
    model = model_path()
    records = toyworld.RECORDS / toyworld.model_fingerprint(model)
    toyworld.unpack_records(records, "fast, our masks")
    pipe = ConceptExpressPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = (
        {(r["config"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())}
        if out.is_file()
        else set()
    )
    configs = [parse_config(c) for c in args.config]
    seeds = [int(x) for x in args.seeds.split(",")]
    for seed in seeds:
        if all((name, seed) in done for name, _ in configs):
            continue
        folder = toyworld._result_path(records, "fast, our masks", seed).parent
        record = json.loads((folder / "result.json").read_text())
        emb = load_file(str(folder / "embeddings.safetensors"))["embeddings"]
        scene = render_scene(seed, num_objects=record["objects"])
        loc, latents = scene_inputs(pipe, scene)
        if loc.num_concepts != emb.shape[0]:
            print(f"scene {seed}: {loc.num_concepts} concepts found, the record has {emb.shape[0]}; skipped")
            continue
        grid = toyworld._samples_record(
            folder, argparse.Namespace(inference_steps=50, guidance=7.5, samples=4, seed=0)
        )
        tmp = Path(".toyworld-runs/probes/tokens") / str(seed)
        toyworld.unpack_samples(grid, toyworld.sample_names(emb.shape[0]), 4, tmp)
        base = [
            [toyworld.PIL.Image.open(tmp / f"concept_{k + 1}_{i}.png") for i in range(4)]
            for k in range(emb.shape[0])
        ]
        tokens_rows = toyworld_lora.read_singles(base, record["targets"], scene)
        for name, opts in configs:
            if (name, seed) in done:
                continue
            config = LearningConfig(**opts)
            t0 = time.perf_counter()
            learned, lora = train_lora(
                tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, unet=pipe.unet, scheduler=pipe.scheduler,
                latents=latents, masks=loc.latent_masks, features=loc.features,
                learned=LearnedConcepts(emb, emb, 0, 0, []), config=config,
                generator=torch.Generator().manual_seed(0),
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            tokens = concept_token_names("<ce>", emb.shape[0])
            output = ConceptExpressOutput(
                tokens=tokens, embeddings=learned.embeddings, localization=None, lora=lora
            )
            pipe.load_concepts(output)
            try:
                rows = toyworld_lora.read_singles(
                    toyworld_lora.singles(pipe, tokens, args), record["targets"], scene
                )
                plain = [
                    (c, s, classify(toyworld_lora.generate(pipe, f"a photo of a {c} {s}", 1, args))[0])
                    for c, s in PLAIN_PROMPTS
                ]
            finally:
                pipe.unload_concepts(output)
            line = {
                "config": name, "options": opts, "seed": seed, "seconds": seconds,
                "samples": learned.num_unet_samples, "tokens_alone": toyworld_lora.share(tokens_rows),
                "lora": toyworld_lora.share(rows), "plain": sum(r["shape"] == s and r["color"] == c for c, s, r in plain) / len(plain),
                "per_concept_tokens": tokens_rows, "per_concept_lora": rows,
                "embedding_shift": float((learned.embeddings - emb).norm(dim=-1).div(emb.norm(dim=-1)).max()),
                "final_loss": learned.history[-1]["diffusion"] if learned.history else None,
            }  # fmt: skip
            with out.open("a") as handle:
                handle.write(json.dumps(line) + "\n")
            print(
                f"[{name}] scene {seed}: tokens alone {line['tokens_alone']:.0%}, with LoRA {line['lora']:.0%}, "
                f"plain {line['plain']:.0%}, {seconds:.0f} s",
                flush=True,
            )
    print(
        summary_table([json.loads(x) for x in out.read_text().splitlines()], [n for n, _ in configs], seeds)
    )


def summary_table(lines: list[dict], configs: list[str], seeds: list[int]) -> str:
    """Per config, over ``seeds``: generations right with the record's tokens alone and with the LoRA, plain
    prompts right (:data:`PLAIN_PROMPTS` per scene) and the LoRA phase's seconds (a markdown table)."""
    rows = [
        "| config | scenes | tokens alone | with LoRA | plain prompts | LoRA phase s |",
        "|---|---|---|---|---|---|",
    ]
    for name in configs:
        mine = [x for x in lines if x["config"] == name and x["seed"] in seeds]
        if not mine:
            continue
        images = sum(c["images"] for x in mine for c in x["per_concept_lora"])
        alone = sum(c["both"] for x in mine for c in x["per_concept_tokens"])
        lora = sum(c["both"] for x in mine for c in x["per_concept_lora"])
        plain = round(sum(x["plain"] * len(PLAIN_PROMPTS) for x in mine))
        secs = [x["seconds"] for x in mine]
        rows.append(
            f"| {name} | {len(mine)} | {alone}/{images} | {lora}/{images} | {plain}/{len(PLAIN_PROMPTS) * len(mine)} | "
            f"{min(secs):.0f}-{max(secs):.0f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
