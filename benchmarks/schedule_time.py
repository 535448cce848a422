"""Wall time of one extraction per schedule, on the same toy image in one process, and the ratios.

    python benchmarks/schedule_time.py [--schedules faithful,turbo] [--seed 20001] [--threads 2]

Each schedule runs ``extract_concepts`` (localization with our masks, then learning with the schedule's
defaults) on the same toy scene with the same seed, one after the other in this process; prints a markdown
table (seconds, UNet samples, concepts) and the first schedule's time over each other's, and writes JSON to
``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.learning import SCHEDULES
from diffusers_conceptexpress.toyworld import model_path, render_scene


def time_schedules(pipe, image, schedules: list[str], seed: int = 0, **options) -> list[dict]:
    """One ``extract_concepts`` per schedule on ``image``: its seconds, UNet samples and concepts."""
    rows = []
    for schedule in schedules:
        t0 = time.perf_counter()
        out = pipe.extract_concepts(
            image, schedule=schedule, generator=torch.Generator().manual_seed(seed), load=False, **options
        )
        rows.append(
            {
                "schedule": schedule,
                "seconds": time.perf_counter() - t0,
                "unet_samples": out.learning.num_unet_samples,
                "updates": out.learning.num_updates,
                "concepts": int(out.embeddings.shape[0]),
            }
        )
        print(f"{schedule}: {rows[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    base = rows[0]
    lines = [
        f"| schedule | seconds | UNet samples | updates | concepts | {base['schedule']} / this |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['schedule']} | {r['seconds']:.1f} | {r['unet_samples']} | {r['updates']} | {r['concepts']} | "
            f"{base['seconds'] / r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", default="faithful,turbo", help=f"comma-separated, of {SCHEDULES}")
    parser.add_argument("--seed", type=int, default=20_001, help="toy scene (20,000+: the tuning scenes)")
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: each schedule's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/schedule_time.json"))
    args = parser.parse_args()
    schedules = args.schedules.split(",")
    unknown = sorted(set(schedules) - set(SCHEDULES))
    if unknown:
        parser.error(f"unknown schedule(s) {unknown}; choose among {SCHEDULES}")
    torch.set_num_threads(args.threads)
    pipe = ConceptExpressPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    scene = render_scene(args.seed, num_objects=args.objects)
    rows = time_schedules(pipe, scene.image, schedules, num_train_steps=args.steps)
    print(markdown(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "command": "python benchmarks/schedule_time.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{args.threads} thread(s)",
        "scene": args.seed,
    }
    args.out.write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
