"""How much does the toy UNet use each word of its prompt, per noise level? (conditioning gain)

    python research/probes/toyworld_conditioning.py [--unet-checkpoint .toyworld-runs/v3/unet.pt] [--scenes 48]

On fresh single-object scenes, the epsilon-prediction MSE of the UNet at fixed timesteps with the true
caption, with the shape word swapped for another shape, with the colour word swapped, and with the empty
prompt (same noise for all four): ``research.toyworld_training.diagnostics.conditioning_gain``, which the
trainer also logs. The gap "wrong shape - true" is what the UNet gains from the shape word at that noise
level: ~0 means the shape word is ignored there. Prints a markdown table (gaps in % of the true-caption MSE).
"""

from __future__ import annotations

import argparse

import _paths  # noqa: F401  (sys.path: the repository root and benchmarks/)
import torch
from diffusers import UNet2DConditionModel

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.toyworld import model_path
from research.toyworld_training.diagnostics import conditioning_gain
from research.toyworld_training.models import load_unet_checkpoint

TIMESTEPS = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped toy model)")
    p.add_argument("--unet-checkpoint", default=None, help="a training checkpoint's EMA UNet instead")
    p.add_argument("--scenes", type=int, default=48)
    p.add_argument("--seed", type=int, default=30_000, help="first scene seed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = args.model or model_path()
    unet = (
        load_unet_checkpoint(args.unet_checkpoint)
        if args.unet_checkpoint
        else UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    )
    pipe = ConceptExpressPipeline.from_pretrained(path, unet=unet)
    gains = conditioning_gain(pipe, range(args.seed, args.seed + args.scenes), timesteps=TIMESTEPS)
    print("| t | MSE, true caption | wrong shape | wrong colour | empty prompt |")
    print("|---|---|---|---|---|")
    for t, row in gains.items():
        rest = " | ".join(f"{100 * row[k]:+.1f}%" for k in ("wrong shape", "wrong colour", "empty"))
        print(f"| {t} | {row['true']:.4f} | {rest} |")


if __name__ == "__main__":
    main()
