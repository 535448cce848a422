"""Find the concepts of an image and save their masks (``mask_1.png`` ... ``mask_K.png``) and an overlay.

    python examples/localize_concepts.py IMAGE MODEL [OUT_DIR]

MODEL is a diffusers folder or a model id of a Stable Diffusion 1.x / 2.x checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from diffusers_conceptexpress import ConceptExpressPipeline, load_image
from diffusers_conceptexpress.export import mask_filename
from diffusers_conceptexpress.visualize import overlay_masks


def main(image: str, model: str, out: str = "concepts") -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = ConceptExpressPipeline.from_pretrained(model, dtype=dtype).to(device)
    result = pipe.localize_concepts(image)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, mask in enumerate(result.masks, start=1):
        mask.save(out_dir / mask_filename(k))
    names = [f"concept {k}" for k in range(1, result.num_concepts + 1)]
    overlay_masks(load_image(image), result.masks, names).save(out_dir / "overlay.png")
    print(f"{result.num_concepts} concepts, EOT scores {result.eot_scores.tolist()}; written to {out_dir}")
    for note in result.notes:
        print("note:", note)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:4])
