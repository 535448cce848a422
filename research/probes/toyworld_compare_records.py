"""Do two extraction record folders hold the same learned embeddings?

    python research/probes/toyworld_compare_records.py A B

A and B are ``benchmarks/toyworld.py`` record folders of one variant (``.../<fingerprint>/fast_GT-masks``).
For every seed in both, prints whether the embeddings are bit-identical and the largest row difference as a
share of that row's norm in A.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args()
    for folder in sorted(args.a.iterdir()):
        other = args.b / folder.name / "embeddings.safetensors"
        if not (folder / "embeddings.safetensors").is_file() or not other.is_file():
            continue
        x = load_file(str(folder / "embeddings.safetensors"))["embeddings"]
        y = load_file(str(other))["embeddings"]
        share = float(((x - y).norm(dim=-1) / x.norm(dim=-1)).max())
        print(f"{folder.name}: identical {bool((x == y).all())}, largest row difference {share:.0%}")


if __name__ == "__main__":
    main()
