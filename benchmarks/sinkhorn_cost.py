"""Wall time of the authors' Sinkhorn (200 log-domain iterations, reg 1e-3, dual gradient) per training step.

    python benchmarks/sinkhorn_cost.py [--maps 15] [--threads 2]

Times one forward + backward of ``losses.sinkhorn_distance`` on ``--maps`` maps (15 = the split phase of
K = 3: 5 tokens per concept) at 8x8 (64 cells) and 16x16 (256 cells, SD's alignment resolution at 512 px),
dense (every log-sum-exp term) and pruned (the terms that underflow to 0 skipped; the CPU default), on
two kinds of input: uniform random histograms, and what the alignment loss sees (binary-mask targets
against peaked attention-like maps, whose potentials spread much further). Also prints the largest
relative difference between the two values (float rounding only).

Each is timed with the library's log-sum-exp (terms far below the largest raised to ``max - 80``, so that
``exp`` never underflows) and with ``torch.logsumexp`` / ``torch.exp`` ("torch exp" columns: the code before
2026-11-30, same values bit for bit), whose ``exp`` takes a slow path on a CPU for results that underflow.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from diffusers_conceptexpress import losses
from diffusers_conceptexpress.losses import grid_cost, sinkhorn_distance


@contextlib.contextmanager
def torch_exp():
    """Run Sinkhorn with torch's own log-sum-exp and exp (the reference the columns are compared with)."""
    saved = losses._logsumexp, losses._exp_flushed
    losses._logsumexp, losses._exp_flushed = torch.logsumexp, torch.exp
    try:
        yield
    finally:
        losses._logsumexp, losses._exp_flushed = saved


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
    variants = [("dense, torch exp", False, True), ("dense", False, False)]
    variants += [("pruned, torch exp", True, True), ("pruned", True, False)]
    print(
        f"| grid | maps | {' | '.join(v[0] for v in variants)} | speed-up | max relative value difference |"
    )
    print("|---|---|" + "---|" * len(variants) + "---|---|")
    for side in (8, 16):
        cost = grid_cost(side, side)
        for kind in ("random", "mask vs attention"):
            a, b = maps(kind, side, args.maps, torch.Generator().manual_seed(side))
            best, values = {}, {}
            for name, prune, reference in variants:
                times = []
                with torch_exp() if reference else contextlib.nullcontext():
                    for _ in range(args.repeats):
                        x = b.clone().requires_grad_(True)
                        t0 = time.perf_counter()
                        value = sinkhorn_distance(a, x, cost, prune=prune)
                        value.sum().backward()
                        times.append(time.perf_counter() - t0)
                best[name], values[name] = min(times), value.detach()
            ref = values["dense, torch exp"]
            diff = max(((v - ref).abs() / ref.abs().clamp_min(1e-30)).max().item() for v in values.values())
            times = " | ".join(f"{best[v[0]]:.3f}" for v in variants)
            speedup = best["dense, torch exp"] / best["pruned"]
            print(f"| {side}x{side} | {kind} | {times} | {speedup:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
