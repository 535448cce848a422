"""Can the toy model draw TWO named objects in one picture? The ceiling of the LoRA benchmark's composition read.

    python research/probes/toyworld_composition_base.py [--pairs 24] [--samples 2] [--threads 2]

``benchmarks/toyworld_lora.py`` reads "a photo of <ce>_k and a <colour> <shape>" with ``read_named_object``
(the named object found among the others). This asks the same of the BASE model with words on both sides:
"a photo of a <c1> <s1> and a <c2> <s2>" for ``--pairs`` random pairs of two different colours (drawn from
``--seed``), ``--samples`` images each (DDIM 50, guidance 7.5, seeds 0.., the benchmark's protocol), and
reads each named object with ``read_named_object``: the second (the benchmark's slot), the first, and both.
No scene and no fresh seed is involved. Prints a table; JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _paths  # noqa: F401  (benchmarks/ on sys.path)
import numpy as np
import torch

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.atomic import atomic_file
from diffusers_conceptexpress.toyworld import model_path
from toyworld_lora import generate_prompts, plain_prompts, read_named_object


def pairs(count: int, seed: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """``count`` ordered pairs of (colour, shape) of two different colours, drawn from ``seed``."""
    pool = plain_prompts()
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        i, j = rng.choice(len(pool), size=2, replace=False)
        if pool[i][0] != pool[j][0]:
            out.append((pool[int(i)], pool[int(j)]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="draws the pairs; image seeds are 0..samples-1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=8, help="prompts per pipeline call")
    p.add_argument("--out", type=Path, default=Path(".toyworld-runs/probes/toyworld_composition_base.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = ConceptExpressPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    todo = pairs(args.pairs, args.seed)
    protocol = argparse.Namespace(inference_steps=50, guidance=7.5, seed=0)  # the benchmark's generations
    rows = []
    for start in range(0, len(todo), args.chunk):
        part = todo[start : start + args.chunk]
        prompts = [f"a photo of a {c1} {s1} and a {c2} {s2}" for (c1, s1), (c2, s2) in part]
        images = generate_prompts(pipe, prompts, args.samples, protocol)
        for n, im in enumerate(images):
            (c1, s1), (c2, s2) = part[n // args.samples]
            first, second = read_named_object(im, c1, s1), read_named_object(im, c2, s2)
            rows.append(
                {"first": f"{c1} {s1}", "second": f"{c2} {s2}", "found_first": first, "found_second": second}
            )
        print(f"{len(rows)} / {len(todo) * args.samples} images", flush=True)
    n = len(rows)
    summary = {
        "command": "python research/probes/toyworld_composition_base.py "
        f"--pairs {args.pairs} --samples {args.samples} --seed {args.seed}",
        "images": n,
        "second_found": sum(r["found_second"] for r in rows) / n,
        "first_found": sum(r["found_first"] for r in rows) / n,
        "both_found": sum(r["found_first"] and r["found_second"] for r in rows) / n,
        "rows": rows,
    }
    print("| base model, two named objects | images | second found | first found | both found |")
    print("|---|---|---|---|---|")
    print(
        f'| "a photo of a <c1> <s1> and a <c2> <s2>" | {n} | {summary["second_found"]:.0%} | '
        f"{summary['first_found']:.0%} | {summary['both_found']:.0%} |"
    )
    with atomic_file(args.out, "w") as handle:
        handle.write(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
