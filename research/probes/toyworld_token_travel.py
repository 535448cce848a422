"""How far do learned tokens travel from their initialisation, per schedule? (Read from extraction records.)

    python research/probes/toyworld_token_travel.py [--records benchmarks/results/toyworld_extraction]

For every record folder ``<fingerprint>/<variant>/<seed>/embeddings.safetensors`` written by
``benchmarks/toyworld.py``, the L2 distance between each learned concept embedding and its starting point
(the mean of the concept's 5 split tokens' initial rows, ``default_init_ids`` of the shipped text encoder),
and the learned embedding's norm. For scale: a toy word row has norm ~0.2, a colour + shape sum ~0.3. Prints
one line per fingerprint and variant (mean over concepts) and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from safetensors.torch import load_file
from transformers import CLIPTextModel

from diffusers_conceptexpress.atomic import atomic_file
from diffusers_conceptexpress.learning import LearningConfig
from diffusers_conceptexpress.tokens import default_init_ids
from diffusers_conceptexpress.toyworld import model_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=Path, default=Path("benchmarks/results/toyworld_extraction"))
    p.add_argument("--out", type=Path, default=Path(".toyworld-runs/probes/toyworld_token_travel.json"))
    args = p.parse_args()
    table = (
        CLIPTextModel.from_pretrained(model_path(), subfolder="text_encoder").get_input_embeddings().weight
    )
    table = table.detach().float()
    split = LearningConfig().tokens_per_concept
    travel: dict[tuple[str, str], list[float]] = defaultdict(list)
    norms: dict[tuple[str, str], list[float]] = defaultdict(list)
    for path in sorted(args.records.glob("*/*/*/embeddings.safetensors")):
        fingerprint, variant = path.parts[-4], path.parts[-3]
        for learned in load_file(path).values():
            k = learned.shape[0]
            ids = default_init_ids(table.shape[0], k * split, LearningConfig().init_offset)
            start = table[ids].reshape(k, split, -1).mean(1)
            travel[fingerprint, variant] += (learned.float() - start).norm(dim=-1).tolist()
            norms[fingerprint, variant] += learned.float().norm(dim=-1).tolist()
    rows = [
        {
            "fingerprint": f,
            "variant": v,
            "concepts": len(d),
            "travel": round(float(np.mean(d)), 3),
            "norm": round(float(np.mean(norms[f, v])), 3),
        }
        for (f, v), d in sorted(travel.items())
    ]
    print(f"{'model':14s} {'variant':20s} {'concepts':>8s} {'travel':>7s} {'norm':>6s}")
    for r in rows:
        print(
            f"{r['fingerprint']:14s} {r['variant']:20s} {r['concepts']:8d} {r['travel']:7.3f} {r['norm']:6.3f}"
        )
    with atomic_file(args.out, "w") as handle:
        json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
