"""How much does the toy UNet use each word of its prompt, per noise level? (conditioning gain)

    python benchmarks/toyworld_conditioning.py [--unet-checkpoint .toyworld-runs/v2/unet.pt] [--scenes 48]

On fresh single-object scenes, the epsilon-prediction MSE of the UNet at fixed timesteps with the true
caption, with the shape word swapped for another shape, with the colour word swapped, and with the empty
prompt (same noise for all four). The gap "wrong shape - true" is what the UNet gains from the shape word
at that noise level: ~0 means the shape word is ignored there. Prints a table (relative gaps in % of the
true-caption MSE).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffusers_conceptexpress.toyworld import COLORS, SHAPES, model_path, render_scene
from diffusers_conceptexpress.toyworld.scenes import caption_for
from diffusers_conceptexpress.toyworld.train import load_unet_checkpoint, make_scheduler, to_tensor

TIMESTEPS = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--unet-checkpoint", default=None, help="a training checkpoint instead of the shipped UNet"
    )
    p.add_argument("--scenes", type=int, default=48)
    p.add_argument("--seed", type=int, default=30_000, help="first scene seed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    path = model_path()
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").eval()
    if args.unet_checkpoint:
        unet = load_unet_checkpoint(args.unet_checkpoint)
    else:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    acp = make_scheduler().alphas_cumprod

    rng = np.random.default_rng(0)
    scenes = [render_scene(args.seed + i, num_objects=1) for i in range(args.scenes)]
    captions: dict[str, list[str]] = {"true": [], "wrong shape": [], "wrong colour": [], "empty": []}
    for s in scenes:
        obj = dict(s.objects[0])
        captions["true"].append(s.caption)
        captions["wrong shape"].append(
            caption_for([{**obj, "shape": rng.choice([x for x in SHAPES if x != obj["shape"]])}])
        )
        captions["wrong colour"].append(
            caption_for([{**obj, "color": rng.choice([x for x in COLORS if x != obj["color"]])}])
        )
        captions["empty"].append("")

    def encode(batch: list[str]) -> torch.Tensor:
        ids = tok(batch, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        return text(ids).last_hidden_state

    cond = {k: encode(v) for k, v in captions.items()}
    z0 = vae.encode(to_tensor([s.image for s in scenes])).latent_dist.mean * vae.config.scaling_factor
    g = torch.Generator().manual_seed(0)
    rows = []
    for t in TIMESTEPS:
        eps = torch.randn(z0.shape, generator=g)
        zt = acp[t].sqrt() * z0 + (1 - acp[t]).sqrt() * eps
        tt = torch.full((len(scenes),), t)
        mse = {
            k: float(((unet(zt, tt, encoder_hidden_states=c).sample - eps) ** 2).mean())
            for k, c in cond.items()
        }
        rows.append((t, mse))
    print("| t | MSE true | wrong shape | wrong colour | empty |")
    print("|---|---|---|---|---|")
    for t, m in rows:
        base = m["true"]
        gaps = " | ".join(
            f"{100 * (m[k] - base) / base:+.1f}%" for k in ("wrong shape", "wrong colour", "empty")
        )
        print(f"| {t} | {base:.4f} | {gaps} |")


if __name__ == "__main__":
    main()
