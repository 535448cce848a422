"""What the trainer reports about a UNet besides its loss, and the picture of a run's log.

- :func:`attention_diagnostics`: the empty prompt's [EOT] object/background ratio and the k-means mIoU of the
  method's own localization on held-out scenes;
- :func:`conditioning_gain`: how much the UNet uses the shape and colour words, per noise level;
- :func:`plot_log`: the loss and diagnostic curves of ``log.jsonl`` as one PNG.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusers_conceptexpress.toyworld.scenes import (
    COLORS,
    IMAGE_SIZE,
    RIM_WIDTH,
    SHAPES,
    caption_for,
    render_scene,
)

from .data import to_tensor
from .models import make_scheduler


def attention_diagnostics(pipe, seeds, rim: int = RIM_WIDTH) -> dict:
    """EOT object/background ratio of the empty prompt and k-means (true K + background) mIoU on scenes."""
    from diffusers_conceptexpress.evaluation import mask_metrics

    ratios, mious = [], []
    for s in seeds:
        scene = render_scene(int(s), num_objects=2 + int(s) % 2, rim=rim)
        res = pipe.localize_concepts(
            scene.image,
            method="kmeans",
            num_concepts=len(scene.masks) + 1,
            generator=torch.Generator().manual_seed(0),
        )
        eot = F.interpolate(res.eot_map[None, None].float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")[
            0, 0
        ].numpy()
        obj = np.any(scene.masks, axis=0)
        ratios.append(float(eot[obj].mean() / max(eot[~obj].mean(), 1e-12)))
        mious.append(mask_metrics(scene.masks, [np.asarray(m, dtype=bool) for m in res.masks]).miou)
    ratios_a = np.array(ratios)
    return {
        "eot_ratio_mean": round(float(ratios_a.mean()), 3),
        "eot_share_gt1": round(float((ratios_a > 1).mean()), 3),
        "kmeans_miou": round(float(np.mean(mious)), 3),
    }


CONDITIONING_CAPTIONS = ("true", "wrong shape", "wrong colour", "empty")


@torch.no_grad()
def conditioning_gain(
    pipe, seeds, timesteps=(250, 550, 750, 850), noise_seed: int = 0, rim: int = RIM_WIDTH
) -> dict:
    """How much the UNet uses each word: epsilon MSE per timestep with altered captions, on single objects.

    On single-object scenes (``seeds``), the epsilon-prediction MSE with the true caption, with the shape
    word swapped for another shape, the colour word swapped, and the empty prompt, all with the same noise.
    Returns ``{t: {"true": mse, "wrong shape": relative gap, ...}}`` where a gap is ``(mse - true) / true``:
    what the UNet gains from that part of the prompt at that noise level (about 0: ignored there).
    """
    rng = np.random.default_rng(noise_seed)
    scenes = [render_scene(int(s), num_objects=1, rim=rim) for s in seeds]
    captions = {name: [] for name in CONDITIONING_CAPTIONS}
    for scene in scenes:
        obj = dict(scene.objects[0])
        other_shape = rng.choice([x for x in SHAPES if x != obj["shape"]])
        other_colour = rng.choice([x for x in COLORS if x != obj["color"]])
        captions["true"].append(scene.caption)
        captions["wrong shape"].append(caption_for([{**obj, "shape": str(other_shape)}]))
        captions["wrong colour"].append(caption_for([{**obj, "color": str(other_colour)}]))
        captions["empty"].append("")
    tok = pipe.tokenizer
    cond = {
        name: pipe.text_encoder(
            tok(text, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        ).last_hidden_state
        for name, text in captions.items()
    }
    vae, unet = pipe.vae, pipe.unet
    z0 = vae.encode(to_tensor([sc.image for sc in scenes])).latent_dist.mean * vae.config.scaling_factor
    acp = make_scheduler().alphas_cumprod
    g = torch.Generator().manual_seed(noise_seed)
    out = {}
    for t in timesteps:
        eps = torch.randn(z0.shape, generator=g)
        zt = acp[t].sqrt() * z0 + (1 - acp[t]).sqrt() * eps
        tt = torch.full((len(scenes),), int(t))
        mse = {
            k: float(((unet(zt, tt, encoder_hidden_states=c).sample - eps) ** 2).mean())
            for k, c in cond.items()
        }
        base = mse["true"]
        out[int(t)] = {
            "true": round(base, 5),
            **{k: round((mse[k] - base) / base, 4) for k in CONDITIONING_CAPTIONS[1:]},
        }
    return out


def plot_log(run_dir: Path, out: Path) -> None:
    """Loss curves of the stages (from log.jsonl) as one PNG, drawn with PIL (no matplotlib needed)."""
    from PIL import Image, ImageDraw

    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    panels = []
    for stage, key in (("vae", "loss"), ("clip", "loss"), ("unet", "loss")):
        pts = [(r["step"], r[key]) for r in records if r.get("stage") == stage and key in r and "step" in r]
        if pts:
            pts = sorted(dict(pts).items())  # a resumed stage repeats steps: keep the last value of each
            panels.append((f"{stage} {key}", pts))
    diag = [(r["step"], r["diag"]) for r in records if r.get("stage") == "unet" and "diag" in r]
    if diag:
        diag = sorted(dict(diag).items())
        panels.append(
            ("unet: EOT obj/bg ratio (mean, 8 scenes)", [(s, d["eot_ratio_mean"]) for s, d in diag])
        )
        panels.append(("unet: k-means (K+1) mIoU, 8 scenes", [(s, d["kmeans_miou"]) for s, d in diag]))
        gain = [(s, d["shape_gain"]["750"]) for s, d in diag if "750" in d.get("shape_gain", {})]
        if gain:  # logged from the third run on (JSON turns the timestep keys into strings)
            panels.append(("unet: shape-word gain at t=750", gain))
    w, h, pad = 420, 260, 40
    img = Image.new("RGB", (w * len(panels), h), "white")
    draw = ImageDraw.Draw(img)
    for k, (title, pts) in enumerate(panels):
        x0 = k * w
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        log_y = "loss" in title and min(ys) > 0
        ty = [math.log10(y) for y in ys] if log_y else ys
        lo, hi = min(ty), max(ty)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        x_lo, x_span = min(xs), max(max(xs) - min(xs), 1)

        def sx(v: float, x0: int = x0, x_lo: float = x_lo, x_span: float = x_span) -> float:
            return x0 + pad + (v - x_lo) / x_span * (w - 2 * pad)

        def sy(v: float, lo: float = lo, hi: float = hi) -> float:
            return h - pad - (v - lo) / (hi - lo) * (h - 2 * pad)

        draw.rectangle([x0 + pad, pad, x0 + w - pad, h - pad], outline="black")
        if len(pts) > 1:
            draw.line([(sx(a), sy(b)) for a, b in zip(xs, ty, strict=True)], fill="blue", width=2)
        for a, b in zip(xs, ty, strict=True):
            draw.ellipse([sx(a) - 2, sy(b) - 2, sx(a) + 2, sy(b) + 2], fill="blue")
        draw.text((x0 + pad, 10), title + (" (log10)" if log_y else ""), fill="black")
        draw.text((x0 + 2, pad - 5), f"{(10**hi if log_y else hi):.3g}", fill="black")
        draw.text((x0 + 2, h - pad - 5), f"{(10**lo if log_y else lo):.3g}", fill="black")
        draw.text((x0 + pad, h - pad + 5), f"step {min(xs)}", fill="black")
        draw.text((x0 + w - pad - 60, h - pad + 5), f"{max(xs)}", fill="black")
        if "ratio" in title and lo < 1 < hi:
            draw.line([(x0 + pad, sy(1.0)), (x0 + w - pad, sy(1.0))], fill="red")
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
