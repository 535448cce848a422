"""Does the toy model understand prompts of the LEARNING form, one slot per object?

    python research/probes/toyworld_prompt_forms.py [--model DIR] [--samples 2] [--scenes 12] [--threads 1]

ConceptExpress learns one token per concept and prompts "a photo of <c_0>" and "a photo of <c_0> and <c_1>";
the toy model was trained on captions with two or three words per object ("a photo of a red circle").
Two measurements:

1. **Text-to-image per prompt form**, every shape x colour pair, ``--samples`` each (DDIM 25, CFG 5 unless
   ``--inference-steps`` / ``--guidance`` say otherwise), read by
   ``toyworld.classify``: the training form "a photo of a red circle"; without the article
   "a photo of red circle"; and the learning form "a photo of <x>" where ``<x>`` is ONE new token whose
   embedding is the sum of the word embeddings of "red" and "circle", loaded with diffusers'
   ``load_textual_inversion`` (the ceiling of what one learned token can express through this text
   encoder when it lands on that point). ``--forms`` picks some of them (``caption``, ``no-article``,
   ``slot``); the JSON also holds the colours read per asked colour (``colours_read``).
2. **What the masked diffusion loss can learn from** (the signal of concept learning): on ``--scenes`` fresh
   single-object scenes (seeds 30,000 + i), the epsilon MSE inside the object's mask (the method's masked
   loss) per quarter of the timestep range, with the empty prompt, the true caption, the one-slot form of the
   true object, and a wrong object (same noise for all). "empty - slot" > 0 is the reduction one learned
   token can buy; where it is ~0 or negative, the loss has nothing to teach the token.

Prints markdown tables and writes ``.toyworld-runs/probes/toyworld_prompt_forms.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from diffusers_conceptexpress.atomic import atomic_file
from diffusers_conceptexpress.toyworld import COLORS, SHAPES, classify, model_path, render_scene

BINS = ((0, 250), (250, 500), (500, 750), (750, 1000))


def slot_embedding(pipe, words: list[str]) -> torch.Tensor:
    """The sum of the input embeddings of ``words`` (each one token in the toy vocabulary), (d,)."""
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer(" ".join(words), add_special_tokens=False).input_ids
    return table[ids].sum(0).detach().clone()


def load_slots(pipe, striped: bool = False) -> dict[tuple[str, str], str]:
    """One textual-inversion token per (colour, shape): ``<slot-red-circle>`` = red + circle (+ striped)."""
    names, vectors = [], []
    for color, shape in itertools.product(COLORS, SHAPES):
        names.append(f"<slot-{color}-{shape}>")
        vectors.append(slot_embedding(pipe, [color, "striped", shape] if striped else [color, shape]))
    pipe.load_textual_inversion(vectors, token=names)
    return {(c, s): f"<slot-{c}-{s}>" for c, s in itertools.product(COLORS, SHAPES)}


FORMS = ("caption", "no-article", "slot")


def text_to_image(
    pipe,
    slots,
    samples: int,
    seed: int,
    steps: int = 25,
    guidance: float = 5.0,
    striped: bool = False,
    forms: tuple[str, ...] = FORMS,
) -> dict:
    """Shape / colour / both right per prompt form, "both" per shape (``by_shape``) and the colours read per
    asked colour (``colours_read``: asked -> read -> count); with ``striped``, every object of the forms is
    striped ("a photo of a red striped circle", the slot red + striped + circle): texture is not scored.
    ``forms`` picks among the training caption, the caption without the article, and the one-slot form."""
    st = "striped " if striped else ""
    plus = "+striped" if striped else ""
    every = {
        "caption": (f"a photo of a red {st}circle", lambda c, s: f"a photo of a {c} {st}{s}"),
        "no-article": (f"a photo of red {st}circle", lambda c, s: f"a photo of {c} {st}{s}"),
        "slot": (f"a photo of <red{plus}+circle>", lambda c, s: f"a photo of {slots[(c, s)]}"),
    }
    out = {}
    for form, make in (every[f] for f in forms):
        hits = {"shape": [], "color": [], "both": []}
        per_shape = {shape: [] for shape in SHAPES}
        colours_read = {color: {} for color in COLORS}
        for color, shape in itertools.product(COLORS, SHAPES):
            images = pipe(
                make(color, shape),
                num_images_per_prompt=samples,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(seed + i) for i in range(samples)],
            ).images
            for found in classify(images):
                hits["shape"].append(found["shape"] == shape)
                hits["color"].append(found["color"] == color)
                hits["both"].append(found["shape"] == shape and found["color"] == color)
                per_shape[shape].append(hits["both"][-1])
                colours_read[color][found["color"]] = colours_read[color].get(found["color"], 0) + 1
        out[form] = {k: float(np.mean(v)) for k, v in hits.items()}
        out[form]["by_shape"] = {shape: float(np.mean(v)) for shape, v in per_shape.items()}
        out[form]["colours_read"] = colours_read
    return out


@torch.no_grad()
def masked_loss_signal(pipe, slots, scenes: int, start: int, per_bin: int = 48) -> dict:
    tok, text, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    acp_all = pipe.scheduler.alphas_cumprod

    def encode(prompt: str) -> torch.Tensor:
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        return text(ids.input_ids).last_hidden_state

    names = ("empty", "true caption", "one slot", "wrong object")
    total = {k: np.zeros(len(BINS)) for k in names}
    for seed in range(start, start + scenes):
        scene = render_scene(seed, num_objects=1)
        obj = scene.objects[0]
        x = torch.from_numpy(np.asarray(scene.image).copy()).permute(2, 0, 1).float()[None] / 127.5 - 1
        z0 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        mask = torch.nn.functional.interpolate(
            torch.from_numpy(scene.masks[0]).float()[None, None], size=z0.shape[-2:], mode="area"
        )
        mask = (mask > 0.5).float()
        texture = "striped " if obj["texture"] == "striped" else ""
        wrong = (
            "green" if obj["color"] != "green" else "red",
            "cross" if obj["shape"] != "cross" else "circle",
        )
        prompts = {
            "empty": "",
            "true caption": f"a photo of a {obj['color']} {texture}{obj['shape']}",
            "one slot": f"a photo of {slots[(obj['color'], obj['shape'])]}",
            "wrong object": f"a photo of a {wrong[0]} {wrong[1]}",
        }
        cond = {k: encode(p) for k, p in prompts.items()}
        g = torch.Generator().manual_seed(seed)
        for b, (lo, hi) in enumerate(BINS):
            t = torch.randint(lo, hi, (per_bin,), generator=g)
            eps = torch.randn((per_bin, *z0.shape[1:]), generator=g)
            acp = acp_all[t].view(-1, 1, 1, 1)
            zt = acp.sqrt() * z0 + (1 - acp).sqrt() * eps
            for k in names:
                pred = unet(zt, t, encoder_hidden_states=cond[k].expand(per_bin, -1, -1)).sample
                total[k][b] += float((((pred - eps) * mask) ** 2).mean()) / scenes
    return {k: v.tolist() for k, v in total.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="diffusers folder (default: the shipped toy model)")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--scenes", type=int, default=12)
    p.add_argument("--start", type=int, default=30_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inference-steps", type=int, default=25, help="DDIM steps of the text-to-image part")
    p.add_argument("--guidance", type=float, default=5.0, help="CFG scale of the text-to-image part")
    p.add_argument(
        "--striped",
        action="store_true",
        help="text-to-image of striped objects (slot = colour + striped + shape)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--forms", default=",".join(FORMS), help=f"text-to-image prompt forms, comma-separated, of {FORMS}"
    )
    p.add_argument("--out", type=Path, default=Path(".toyworld-runs/probes/toyworld_prompt_forms.json"))
    args = p.parse_args()
    forms = tuple(args.forms.split(","))
    if set(forms) - set(FORMS):
        raise SystemExit(f"--forms: unknown form(s) {sorted(set(forms) - set(FORMS))}; choose from {FORMS}")
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model or model_path(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    slots = load_slots(pipe, args.striped)
    t2i = text_to_image(
        pipe, slots, args.samples, args.seed, args.inference_steps, args.guidance, args.striped, forms
    )
    # part 2 scores each object's own (plain or striped) slot, which the striped-only slots are not;
    # --scenes 0 skips it (the text-to-image part alone)
    signal = (
        None if args.striped or args.scenes < 1 else masked_loss_signal(pipe, slots, args.scenes, args.start)
    )
    print("| prompt form | shape | colour | both | " + " | ".join(f"both: {s}" for s in SHAPES) + " |")
    print("|---" * (4 + len(SHAPES)) + "|")
    for form, r in t2i.items():
        per_shape = " | ".join(f"{r['by_shape'][s]:.0%}" for s in SHAPES)
        print(f"| {form} | {r['shape']:.0%} | {r['color']:.0%} | {r['both']:.0%} | {per_shape} |")
    for form, r in t2i.items():
        wrong = {
            f"{asked}->{read}": n
            for asked, reads in r["colours_read"].items()
            for read, n in reads.items()
            if read != asked
        }
        print(f"colours read wrong, {form}: {wrong or 'none'}")
    with atomic_file(args.out, "w") as handle:
        json.dump({"model": args.model or "shipped", "args": vars(args) | {"out": str(args.out)},
                   "text_to_image": t2i, "masked_mse": signal}, handle, indent=1)  # fmt: skip
    if signal is None:
        return
    print("\n| masked MSE x 1e3 | " + " | ".join(f"t {lo}-{hi}" for lo, hi in BINS) + " |")
    print("|---" * (len(BINS) + 1) + "|")
    for k, v in signal.items():
        print(f"| {k} | " + " | ".join(f"{1e3 * x:.3f}" for x in v) + " |")
    gain = [e - s for e, s in zip(signal["empty"], signal["one slot"], strict=True)]
    print("| empty - one slot | " + " | ".join(f"{1e3 * x:+.3f}" for x in gain) + " |")


if __name__ == "__main__":
    main()
