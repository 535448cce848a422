"""Wall time of the authors' Sinkhorn (200 log-domain iterations, reg 1e-3, dual gradient) per training step.

    python benchmarks/sinkhorn_cost.py [--maps 15] [--threads 2]

Times one forward + backward of ``losses.sinkhorn_distance`` on ``--maps`` random maps (15 = the split phase of
K = 3: 5 tokens per concept) at 8x8 (64 cells) and 16x16 (256 cells, SD's alignment resolution at 512 px).
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusers_conceptexpress.losses import grid_cost, sinkhorn_distance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    for side in (8, 16):
        cost = grid_cost(side, side)
        times = []
        for _ in range(args.repeats):
            a = torch.rand(args.maps, side * side, generator=g).requires_grad_(True)
            b = torch.rand(args.maps, side * side, generator=g)
            t0 = time.perf_counter()
            sinkhorn_distance(a, b, cost).sum().backward()
            times.append(time.perf_counter() - t0)
        print(
            f"{side}x{side}: {min(times):.3f} s per step ({args.maps} maps, {args.threads} threads, best of {args.repeats})"
        )


if __name__ == "__main__":
    main()
