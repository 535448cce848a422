"""Count the UNet sample-passes and optimiser updates of concept learning, per schedule, for K = 1..5.

    python benchmarks/learning_passes.py [--max-k 5] [--out benchmarks/results/learning_passes.json]

Schedules: "fast", "faithful" and "turbo" with their defaults. A "sample-pass" is one latent through the UNet forward and backward. Counts come from the same plan the
training loop executes (``LearningConfig.num_updates`` / ``num_unet_samples``; a test checks them against
real optimiser steps). The authors' code runs every faithful pass as a batch of 2 with one half discarded
and re-encodes the image with the VAE each time: their column doubles the faithful samples and counts VAE
encodes. No model is needed; this prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffusers_conceptexpress.learning import LearningConfig


def table(max_k: int) -> list[dict]:
    rows = []
    fast, faithful = LearningConfig(schedule="fast"), LearningConfig(schedule="faithful")
    turbo = LearningConfig(schedule="turbo")
    for k in range(1, max_k + 1):
        authors = 2 * faithful.num_unet_samples(k)
        rows.append(
            {
                "K": k,
                "fast_updates": fast.num_updates(k),
                "fast_unet_samples": fast.num_unet_samples(k),
                "fast_unet_calls": fast.num_updates(k),
                "faithful_updates": faithful.num_updates(k),
                "faithful_unet_samples": faithful.num_unet_samples(k),
                "turbo_updates": turbo.num_updates(k),
                "turbo_unet_samples": turbo.num_unet_samples(k),
                "turbo_share_of_authors": turbo.num_unet_samples(k) / authors,
                "authors_unet_samples": authors,
                "authors_vae_encodes": faithful.num_updates(k),
                "our_vae_encodes": 2,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-k", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/learning_passes.json"))
    args = parser.parse_args()
    rows = table(args.max_k)
    head = (
        "| K | fast: updates = UNet calls | fast: UNet samples | faithful (ours): updates = UNet calls = samples "
        "| turbo: updates = UNet calls | turbo: UNet samples (share of the authors') "
        "| authors' code: UNet samples | authors' code: VAE encodes | ours (every schedule): VAE encodes (image + its flip) |"
    )
    print(head)
    print("|" + "---|" * 9)
    for r in rows:
        print(
            f"| {r['K']} | {r['fast_updates']} | {r['fast_unet_samples']} | {r['faithful_updates']} | "
            f"{r['turbo_updates']} | {r['turbo_unet_samples']} (1/{1 / r['turbo_share_of_authors']:.1f}) | "
            f"{r['authors_unet_samples']} | {r['authors_vae_encodes']} | {r['our_vae_encodes']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"command": "python benchmarks/learning_passes.py", "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
