"""Does the shipped toy text encoder separate shapes and colours? Mean distance between caption encodings.

    python research/probes/toyworld_text_encoder.py

For every pair of captions "a photo of a {colour} {shape}" that differ only in the shape word (or only in the
colour word), the L2 distance between their first 12 hidden states (the caption, [EOT] and a few pads), and the
mean norm of those states for scale. Then the shape words' INPUT rows (what a one-slot embedding "colour + shape"
and a learned token live among): each row's norm and its cosine with every other shape's row, as a table.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from diffusers_conceptexpress.toyworld import COLORS, SHAPES, model_path


@torch.no_grad()
def main() -> None:
    tok = CLIPTokenizer.from_pretrained(model_path(), subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(model_path(), subfolder="text_encoder").eval()

    def encode(caption: str) -> torch.Tensor:
        ids = tok([caption], padding="max_length", max_length=77, return_tensors="pt").input_ids
        return text(ids).last_hidden_state[0, :12]

    h = {(c, s): encode(f"a photo of a {c} {s}") for c in COLORS for s in SHAPES}
    shape = [
        (h[c, s1] - h[c, s2]).norm().item() for c in COLORS for s1, s2 in itertools.combinations(SHAPES, 2)
    ]
    colour = [
        (h[c1, s] - h[c2, s]).norm().item() for s in SHAPES for c1, c2 in itertools.combinations(COLORS, 2)
    ]
    print(f"captions differing in the shape word:  mean distance {np.mean(shape):.1f}")
    print(f"captions differing in the colour word: mean distance {np.mean(colour):.1f}")
    print(f"mean norm of the encodings: {np.mean([v.norm().item() for v in h.values()]):.1f}")

    rows = text.get_input_embeddings().weight
    word = {w: rows[tok(w, add_special_tokens=False).input_ids[0]] for w in (*SHAPES, *COLORS)}
    print(f"\ncolour word rows: norm {min(word[c].norm().item() for c in COLORS):.3f}-"
          f"{max(word[c].norm().item() for c in COLORS):.3f}")  # fmt: skip
    print("\n| shape word row | norm | " + " | ".join(f"cos with {s}" for s in SHAPES) + " |")
    print("|---" * (len(SHAPES) + 2) + "|")
    for s1 in SHAPES:
        cos = [torch.nn.functional.cosine_similarity(word[s1], word[s2], dim=0).item() for s2 in SHAPES]
        print(f"| {s1} | {word[s1].norm().item():.3f} | " + " | ".join(f"{c:+.2f}" for c in cos) + " |")


if __name__ == "__main__":
    main()
