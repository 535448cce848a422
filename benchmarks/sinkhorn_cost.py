"""Wall time of the authors' Sinkhorn (200 log-domain iterations, reg 1e-3, dual gradient) per training step.

    python benchmarks/sinkhorn_cost.py [--maps 15] [--threads 2]

Times one forward + backward of ``losses.sinkhorn_distance`` on ``--maps`` maps (15 = the split phase of
K = 3: 5 tokens per concept) at 8x8 (64 cells) and 16x16 (256 cells, SD's alignment resolution at 512 px),
dense (every log-sum-exp term) and pruned (the terms that underflow to 0 skipped; the CPU default), on
two kinds of input: uniform random histograms, and what the alignment loss sees (binary-mask targets
against peaked attention-like maps, whose potentials spread much further). Also prints the largest
relative difference between the two values (float rounding only).
"""

from __future__ import annotations

import argparse
import time

import torch

from diffusers_conceptexpress.losses import grid_cost, sinkhorn_distance


def maps(kind: str, side: int, count: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n = side * side
    if kind == "random":
        return torch.rand(count, n, generator=g), torch.rand(count, n, generator=g)
    ys, xs = torch.meshgrid(torch.arange(side * 1.0), torch.arange(side * 1.0), indexing="ij")

    def blob(sigma: float) -> torch.Tensor:
        cy, cx = (torch.rand(2, generator=g) * (side - 4) + 2).tolist()
        return torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2)).flatten()

    masks = torch.stack([(blob(side / 5) > 0.5).float() for _ in range(count)])
    attn = torch.stack(
        [torch.softmax(8 * blob(side / 8) + torch.rand(n, generator=g), 0) for _ in range(count)]
    )
    return masks, attn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maps", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.maps} maps, {args.threads} threads, best of {args.repeats}; seconds per forward + backward")
    print("| grid | maps | dense | pruned | speed-up | max relative value difference |")
    print("|---|---|---|---|---|---|")
    for side in (8, 16):
        cost = grid_cost(side, side)
        for kind in ("random", "mask vs attention"):
            a, b = maps(kind, side, args.maps, torch.Generator().manual_seed(side))
            best, values = {}, {}
            for prune in (False, True):
                times = []
                for _ in range(args.repeats):
                    x = b.clone().requires_grad_(True)
                    t0 = time.perf_counter()
                    value = sinkhorn_distance(a, x, cost, prune=prune)
                    value.sum().backward()
                    times.append(time.perf_counter() - t0)
                best[prune], values[prune] = min(times), value.detach()
            diff = ((values[True] - values[False]).abs() / values[False].abs().clamp_min(1e-30)).max().item()
            print(
                f"| {side}x{side} | {kind} | {best[False]:.3f} | {best[True]:.3f} | "
                f"{best[False] / best[True]:.1f}x | {diff:.1e} |"
            )


if __name__ == "__main__":
    main()
