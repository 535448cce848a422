"""Where a concept-learning step's time goes, on the shipped toy model (CPU by default).

    python benchmarks/learning_profile.py [--schedule fast] [--steps 20] [--seed 20000] [--threads 1]

Runs ``extract_concepts`` with the scene's ground-truth masks (no localization) for ``--steps`` training steps
and times, with wall-clock timers around the pieces: the text encoder's forward, the UNet's forward (and,
inside it, the attention layers that record probabilities for the alignment loss), the Sinkhorn distance's
forward, every ``backward`` (UNet, text encoder and Sinkhorn together) and the optimiser steps; "rest" is the
remainder of the training loop (noise, masks, bookkeeping). Prints a markdown table of seconds per training
step and shares of the total.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections import defaultdict

import torch

from diffusers_conceptexpress import ConceptExpressPipeline
from diffusers_conceptexpress import attention as attention_module
from diffusers_conceptexpress import learning as learning_module
from diffusers_conceptexpress.learning import SCHEDULES
from diffusers_conceptexpress.toyworld import model_path, render_scene

PARTS = (
    "text encoder forward",
    "UNet forward",
    "  of which recorded attention layers",
    "Sinkhorn forward",
    "backward (all)",
    "optimiser step",
    "rest",
)


class Timers:
    """Accumulated seconds per named piece; ``wrap`` times a function, ``hooks`` a module's forward."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def timed(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def wrap(self, fn, name: str):
        def timed_fn(*args, **kwargs):
            with self.timed(name):
                return fn(*args, **kwargs)

        return timed_fn

    def hooks(self, module: torch.nn.Module, name: str) -> list:
        start: list[float] = []

        def pre(*_):
            start.append(time.perf_counter())

        def post(*_):
            self.seconds[name] += time.perf_counter() - start.pop()

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


@contextlib.contextmanager
def instrumented(pipe, timers: Timers):
    """Install the timers for the duration of the block (every patch is undone on exit)."""
    patches = [
        (learning_module, "sinkhorn_distance", "Sinkhorn forward"),
        (attention_module.RecordingAttnProcessor, "_attend", "  of which recorded attention layers"),
        (torch.Tensor, "backward", "backward (all)"),
        (torch.optim.AdamW, "step", "optimiser step"),
    ]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    handles = timers.hooks(pipe.text_encoder, "text encoder forward") + timers.hooks(
        pipe.unet, "UNet forward"
    )
    try:
        for owner, attr, name in patches:
            setattr(owner, attr, timers.wrap(getattr(owner, attr), name))
        yield
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)
        for h in handles:
            h.remove()


def profile(pipe, scene, schedule: str, steps: int, seed: int = 0, **options) -> dict:
    """Seconds per training step of each piece of :data:`PARTS` for one extraction, plus the total."""
    timers = Timers()
    with instrumented(pipe, timers):
        t0 = time.perf_counter()
        out = pipe.extract_concepts(
            scene.image,
            masks=list(scene.masks),
            num_train_steps=steps,
            schedule=schedule,
            generator=torch.Generator().manual_seed(seed),
            load=False,
            **options,
        )
        total = time.perf_counter() - t0
    s = dict(timers.seconds)
    accounted = sum(v for k, v in s.items() if not k.startswith(" "))
    s["rest"] = total - accounted
    return {
        "schedule": schedule,
        "steps": steps,
        "concepts": int(out.embeddings.shape[0]),
        "unet_samples": out.learning.num_unet_samples,
        "total_seconds": total,
        "seconds": {k: s.get(k, 0.0) for k in PARTS},
    }


def markdown(result: dict) -> str:
    total = result["total_seconds"]
    lines = [
        f"{result['schedule']}, {result['steps']} steps, K = {result['concepts']}, "
        f"{result['unet_samples']} UNet samples, {total:.2f} s in all",
        "",
        "| piece | s / step | share |",
        "|---|---|---|",
    ]
    for k, v in result["seconds"].items():
        lines.append(
            f"| {k.strip()}{' (inside the UNet forward)' if k.startswith(' ') else ''} | "
            f"{v / result['steps']:.4f} | {100 * v / total:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedule", default="fast", choices=list(SCHEDULES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=20_000, help="toy scene (20,000+: the tuning scenes)")
    parser.add_argument("--objects", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = ConceptExpressPipeline.from_pretrained(model_path())
    pipe.set_progress_bar_config(disable=True)
    scene = render_scene(args.seed, num_objects=args.objects)
    print(markdown(profile(pipe, scene, args.schedule, args.steps)))


if __name__ == "__main__":
    main()
