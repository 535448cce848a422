"""Does the masked diffusion loss single out a concept's object, and does the learning reach it?

    python research/probes/toyworld_loss_landscape.py [--variants fast_GT-masks,faithful_GT-masks] [--draws 16]

For every concept of the recorded extractions of the shipped toy model (``benchmarks/toyworld.py``'s
records: masks and learned embeddings), evaluates the method's single-concept loss, "a photo of <c>" with
the masked epsilon MSE inside the concept's mask (docs/design.md, "Learning"), for candidate embeddings of
<c>:

- the learned embedding;
- every one-slot embedding "colour + [striped +] shape" (the sum of the word rows: the toy model is trained
  to read such a slot as one object, docs/toyworld.md): the true object's slot and the 47 others;
- the empty prompt.

All candidates share the same ``--draws`` (t, noise) pairs per quarter of the timestep range (common random
numbers), so their differences are not drowned by the draws' noise. Prints per concept the loss of the
learned token, of the true slot, the true slot's rank among the 48 slots, and the best slots, and writes
``.toyworld-runs/probes/toyworld_loss_landscape.json``. If the true slot ranks first, the objective points at
the object and what is missing is the optimisation; if same-colour slots of other shapes tie with it, the
masked loss cannot see the shape (the flat-colour limit).

``--margins 0,2`` repeats every evaluation with the loss mask grown by a band of that many latent cells
(:func:`loss_masks_with_margin`; the same draws for every margin): a diagnostic of whether scoring the cells
just outside the object, where a larger same-colour shape overflows, makes the true slot win.
``--slots colour`` keeps only the six slots of the object's own colour; ``--seeds`` and ``--shapes`` pick
records and objects; ``--model`` scores the slots with another model folder (a trial's), on the shipped
model's records (the "learned" row is then the shipped model's token read by the trial's model).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import _paths  # noqa: F401  (sys.path: the repository root and benchmarks/)
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from toyworld_prompt_forms import slot_embedding

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress.atomic import atomic_file
from diffusers_conceptexpress.masks import masks_to_latent_grid
from diffusers_conceptexpress.toyworld import COLORS, SHAPES, model_path, render_scene
from toyworld import model_fingerprint  # benchmarks/toyworld.py

BINS = ((0, 250), (250, 500), (500, 750), (750, 1000))
PROBE = "<landscape-probe>"


def loss_masks_with_margin(masks: torch.Tensor, margin: int) -> torch.Tensor:
    """Each concept's mask grown by a band of ``margin`` grid cells that no other concept's mask holds.

    The method's masked loss (docs/design.md, "Learning") scores a prompt only inside its concept's mask, so
    a token that draws a larger shape of the same colour there (a circle over a heart) costs nothing. The band adds the cells just
    outside the object, where such an overflow shows; cells of other concepts stay out, so a token is never
    asked to draw its neighbour.

    Args:
        masks: (K, h, w) bool concept masks on one grid (latent cells here; pixels in toyworld_alone --grow).
        margin: width of the band in cells of that grid (Chebyshev distance); 0 returns ``masks`` unchanged.
    Returns:
        (K, h, w) bool masks, each a superset of its input.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0 latent cells, got {margin}.")
    if margin == 0:
        return masks
    m = masks.float()[:, None]
    grown = F.max_pool2d(m, kernel_size=2 * margin + 1, stride=1, padding=margin)[:, 0] > 0
    others = torch.stack([masks[[j for j in range(len(masks)) if j != i]].any(0) for i in range(len(masks))])
    return masks | (grown & ~others)


@torch.no_grad()
def losses(pipe, z0: torch.Tensor, mask: torch.Tensor, candidates: dict, draws: int, seed: int) -> dict:
    """Masked epsilon MSE (mean over all latent elements; docs/design.md, "Learning") per candidate and
    timestep bin."""
    tok, text, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    table = text.get_input_embeddings().weight
    probe_id = tok.convert_tokens_to_ids(PROBE)
    ids = tok(
        [f"a photo of {PROBE}", ""],
        padding="max_length",
        max_length=tok.model_max_length,
        return_tensors="pt",
    ).input_ids
    g = torch.Generator().manual_seed(seed)
    t = torch.cat([torch.randint(lo, hi, (draws,), generator=g) for lo, hi in BINS])
    eps = torch.randn((len(t), *z0.shape[1:]), generator=g)
    acp = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = acp.sqrt() * z0 + (1 - acp).sqrt() * eps
    out = {}
    for name, vector in candidates.items():
        if vector is None:
            states = text(ids[1:]).last_hidden_state
        else:
            table[probe_id] = vector
            states = text(ids[:1]).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=states.expand(len(t), -1, -1)).sample
        per = (((pred - eps) * mask) ** 2).mean((1, 2, 3)).view(len(BINS), draws).mean(1)
        out[name] = [*per.tolist(), float(per.mean())]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="fast_GT-masks,faithful_GT-masks")
    p.add_argument("--records", type=Path, default=Path("benchmarks/results/toyworld_extraction"))
    p.add_argument("--draws", type=int, default=16, help="(t, noise) draws per quarter of the t range")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--margins", default="0", help="loss-mask bands to compare, in latent cells (loss_masks_with_margin)"
    )
    p.add_argument(
        "--slots", choices=("all", "colour"), default="all",
        help="candidate slots: all 48, or only the 6 shapes in the object's own colour (8x cheaper)",
    )  # fmt: skip
    p.add_argument("--seeds", default=None, help="only these record seeds (comma-separated)")
    p.add_argument("--shapes", default=None, help="only objects of these shapes (comma-separated)")
    p.add_argument("--out", type=Path, default=Path(".toyworld-runs/probes/toyworld_loss_landscape.json"))
    p.add_argument(
        "--model",
        default=None,
        help="score the slots with this model folder (default: the shipped one); the records (masks, learned "
        "embeddings) are still the shipped model's",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pipe = ConceptExpressPipeline.from_pretrained(args.model or model_path())
    pipe.load_textual_inversion({PROBE: torch.zeros(pipe.text_encoder.config.hidden_size)})
    folder = args.records / model_fingerprint(model_path())
    margins = [int(m) for m in args.margins.split(",")]
    rows = []
    for variant in args.variants.split(","):
        for record in sorted((folder / variant).glob("*/result.json")):
            result = json.loads(record.read_text())
            if args.seeds and str(result["seed"]) not in args.seeds.split(","):
                continue
            scene = render_scene(result["seed"], num_objects=result["objects"])
            x = torch.from_numpy(np.asarray(scene.image).copy()).permute(2, 0, 1).float()[None] / 127.5 - 1
            with torch.no_grad():
                z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
            masks = list(np.load(record.parent / "masks.npz").values())
            latent = masks_to_latent_grid(masks, scene.image.size, tuple(z0.shape[-2:]))
            learned = load_file(str(record.parent / "embeddings.safetensors"))["embeddings"]
            grown = {margin: loss_masks_with_margin(latent, margin) for margin in margins}
            for (k, target), margin in itertools.product(enumerate(result["targets"]), margins):
                if target is None or target < 0:
                    continue
                if args.shapes and scene.objects[target]["shape"] not in args.shapes.split(","):
                    continue
                loss_mask = grown[margin][k].float()
                obj = scene.objects[target]
                striped = ["striped"] if obj["texture"] == "striped" else []
                slots = {
                    f"{c} {s}": slot_embedding(pipe, [c, *striped, s])
                    for c, s in itertools.product(COLORS, SHAPES)
                    if args.slots == "all" or c == obj["color"]
                }
                candidates = {"learned": learned[k], "empty": None, **slots}
                got = losses(pipe, z0, loss_mask[None, None], candidates, args.draws, args.seed + k)
                true = f"{obj['color']} {obj['shape']}"
                ranked = sorted(slots, key=lambda s: got[s][-1])
                row = {
                    "variant": variant,
                    "seed": result["seed"],
                    "concept": k,
                    "margin": margin,
                    "object": true + (" (striped)" if striped else ""),
                    "loss": got,
                    "true_rank": ranked.index(true) + 1,
                    "best": ranked[:5],
                    "learned_rank": sum(got[s][-1] < got["learned"][-1] for s in slots) + 1,
                    "learned_to_true": float((learned[k] - slots[true]).norm()),
                    "true_norm": float(slots[true].norm()),
                }
                rows.append(row)
                print(
                    f"{variant:18s} {row['seed']} c{k} m{margin} {row['object']:22s} x1e3: learned {1e3 * got['learned'][-1]:.3f}"
                    f" true {1e3 * got[true][-1]:.3f} empty {1e3 * got['empty'][-1]:.3f} | true rank"
                    f" {row['true_rank']}/{len(slots)}, learned beats {row['learned_rank'] - 1}/{len(slots)} | best {ranked[:4]}"
                    f" | |learned - true| {row['learned_to_true']:.3f} (|true| {row['true_norm']:.3f})",
                    flush=True,
                )
    with atomic_file(args.out, "w") as handle:
        json.dump(
            {"args": {k: str(v) for k, v in vars(args).items()}, "bins": BINS, "rows": rows}, handle, indent=1
        )


if __name__ == "__main__":
    main()
