"""Train the toy-world text-to-image model from scratch on this CPU (or a GPU), in resumable stages.

Stages (each resumes from its last checkpoint in ``--run-dir``; a finished stage is skipped):

1. ``vae``: AutoencoderKL (32, 64), factor 2, 4 latent channels, trained on random 32x32 crops of scenes
   (fully convolutional, so it transfers to 64x64); its ``scaling_factor`` is set to 1 / the measured latent
   std.
2. ``pool``: render ``--pool`` scenes, encode them once (posterior mean), tokenize their captions and keep
   their object label maps.
3. ``clip``: CLIP-style contrastive pretraining of the text encoder (CLIPTextModel, 64-d, 3 layers) against a
   small CNN image encoder on the scenes; captions use the method's template ("a photo of a red circle and a
   blue star"). The [EOT] state of the EMPTY prompt is pulled towards the mean image embedding (generic
   "objects"), which is what the method's background filter relies on.
4. ``unet``: UNet2DConditionModel on the 32x32 latent (``--unet-arch``: "attn-32-16", SD's layout one level
   down, shipped; or "attn-32-16-8", the first model; none at 4x4; ``--unet-init`` warm-starts), with the text
   encoder FROZEN (as SD trained on a frozen CLIP). Epsilon prediction, SD's scaled-linear betas, 10%
   empty captions (classifier-free guidance), horizontal flips, EMA weights, ``--unet-weighting`` (plain MSE or
   normalised per noise level). ``--compound-prob`` gives that share of captions in the form of the method's
   learning prompts, ONE input slot per object ("a photo of <x_0> and <x_1>", each slot the sum of its
   object's word embeddings: ``compound_conditioning``); ``--single-prob`` gives a share the method's
   single-concept learning prompt "a photo of <x_k>" for one object k of the scene, with the loss masked to
   that object's latent cells (``single_object_conditioning``); ``--eot-weight`` adds, on a second small batch of
   clean latents at t = 0 with the empty prompt (the localization pass), a hinge loss that makes the [EOT]
   map salient on every object and low on the background (``eot_objectness_loss``; needs a pool with
   labels); ``--contrast-weight`` adds a cross-entropy that ranks an object's own one-slot prompt first by the
   masked loss among the same object with the other shapes (and, with ``--contrast-swap shape,colour``, the
   other colours) (``slot_contrast_loss``; ``--contrast-margin`` makes it a hinge on the error ratio, and
   ``--contrast-own-only`` lets it lower only the own slot's error); ``--unet-target teacher`` replaces the
   noise as the denoising target by the ``--unet-init`` UNet's own prediction for the same input (a frozen
   teacher: the fine-tune keeps the starting model's function except where the other losses move it), and
   ``--unet-train`` names the only parameters it trains;
   ``--group-weight`` adds, on the same pass, a hinge that keeps each cell's self-attention on its own object
   or on the background (``self_attention_grouping_loss``). Every ``--diag-every`` steps it logs the attention
   diagnostics on fixed held-out scenes: the empty prompt's [EOT] object/background ratio and k-means (true K)
   mIoU from the method's own ``localize_concepts``.
5. ``export``: writes the diffusers folder (float32 safetensors) to ``--out``.

Two more stages run only when named: ``rows`` fine-tunes the input embedding rows of ``--rows-words`` alone
(everything else frozen), and ``plot`` draws the run's curves from its log to ``--plot``.

Example (from the repository root; every stage from scratch, as the first shipped model; the later models
fine-tune the shipped one: research/recipes/)::

    python -m research.toyworld_training --run-dir .toyworld-runs/main --threads 1 \\
        --unet-minutes 75 --out src/diffusers_conceptexpress/toyworld/model

Logs go to ``<run-dir>/log.jsonl`` (one JSON object per line) and stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffusers_conceptexpress.toyworld.scenes import RIM_WIDTH, STRIPE_SHADE

from .diagnostics import plot_log
from .models import UNET_ARCHS, export, seed_from_model
from .rows import stage_rows
from .runs import Logger
from .stages import stage_clip, stage_pool, stage_vae
from .unet_stage import stage_unet


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m research.toyworld_training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run-dir", default=".toyworld-runs/main")
    p.add_argument("--stages", default="vae,pool,clip,unet,export")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--rim",
        type=int,
        default=RIM_WIDTH,
        help="render_scene's rim: dark object outlines this many pixels wide (0: the second world)",
    )
    p.add_argument(
        "--stripe-shade",
        type=float,
        default=STRIPE_SHADE,
        help="render_scene's stripe_shade: striped objects' dark bands as a share of their colour",
    )
    p.add_argument("--vae-steps", type=int, default=800)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--pool", type=int, default=30000)
    p.add_argument(
        "--pool-workers", type=int, default=1, help="processes that render and encode the pool (same pool)"
    )
    p.add_argument("--clip-steps", type=int, default=1200)
    p.add_argument("--clip-batch", type=int, default=128)
    p.add_argument("--clip-lr", type=float, default=1e-3)
    p.add_argument("--unet-steps", type=int, default=100000)
    p.add_argument("--unet-minutes", type=float, default=75.0, help="wall-clock budget of the UNet stage")
    p.add_argument("--unet-until", default=None, help="stop the UNet stage at this UTC time, HH:MM")
    p.add_argument("--unet-batch", type=int, default=24)
    p.add_argument(
        "--unet-target",
        choices=["noise", "teacher"],
        default="noise",
        help="the denoising loss's target: the noise (plain training), or the --unet-init UNet's prediction for "
        "the same noisy latent, timestep and prompt (a frozen teacher; logged as distill_loss; 'loss' stays the "
        "plain MSE against the noise)",
    )
    p.add_argument(
        "--unet-train",
        default="",
        help="comma-separated substrings of the UNet parameter names to train (e.g. 'attn2.to_k,attn2.to_v': the "
        "cross-attention's reading of the prompt); the rest stays frozen (default: all)",
    )
    p.add_argument("--unet-log-every", type=int, default=50, help="UNet stage: steps per log line (means)")
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--unet-arch", default="attn-32-16-8", choices=UNET_ARCHS)
    p.add_argument(
        "--unet-init",
        default=None,
        help="warm-start the UNet from this unet.pt (its EMA weights) or exported diffusers folder",
    )
    p.add_argument(
        "--from-model",
        default=None,
        help="seed the run's vae/clip stages from this exported folder (e.g. the shipped toyworld model)",
    )
    p.add_argument("--device", default="cpu", help="device of the UNet stage (cpu, cuda)")
    p.add_argument(
        "--unet-weighting",
        default="uniform",
        choices=["uniform", "noise-level"],
        help="loss weighting over timesteps: plain MSE, or each noise level normalised to the same share",
    )
    p.add_argument(
        "--eot-weight",
        type=float,
        default=0.0,
        help="weight of the [EOT] objectness loss (eot_objectness_loss) on a clean-latent, t = 0, empty-prompt "
        "pass per step (0: off; needs a pool with labels)",
    )
    p.add_argument("--eot-batch", type=int, default=8, help="scenes per step of that pass")
    p.add_argument(
        "--group-weight",
        type=float,
        default=0.0,
        help="weight of the self-attention grouping loss (self_attention_grouping_loss) on the same t = 0 "
        "empty-prompt pass (0: off; needs a pool with labels)",
    )
    p.add_argument(
        "--coherence-weight",
        type=float,
        default=0.0,
        help="weight of the self-attention coherence loss (self_attention_coherence_loss) on the same pass, "
        "on the method's aggregated self-attention (0: off)",
    )
    p.add_argument("--coherence-objects-only", action="store_true", help="do not score the background's rows")
    p.add_argument(
        "--separation-weight",
        type=float,
        default=0.0,
        help="weight of the self-attention separation loss (self_attention_separation_loss): different objects' "
        "mean rows apart (0: off)",
    )
    p.add_argument(
        "--separation-margin",
        type=float,
        default=1.0,
        help="wanted symmetric KL between two objects' mean rows",
    )
    p.add_argument(
        "--coherence-distance", type=float, default=0.05, help="allowed symmetric KL to the object's mean row"
    )
    p.add_argument(
        "--group-target",
        type=float,
        default=0.8,
        help="share of each cell's self-attention wanted on its own object (or on the background)",
    )
    p.add_argument(
        "--single-prob",
        type=float,
        default=0.0,
        help='share of captions given as the method\'s single-concept learning prompt "a photo of <x_k>" for '
        "one object k of the scene, with the loss masked to that object's latent cells "
        "(single_object_conditioning; needs a pool with labels)",
    )
    p.add_argument(
        "--contrast-weight",
        type=float,
        default=0.0,
        help="weight of the slot-contrast loss (slot_contrast_loss): an object's own slot must explain its "
        "masked pixels better than its contrast candidates (--contrast-swap; needs a pool with labels)",
    )
    p.add_argument(
        "--contrast-swap",
        default="shape",
        choices=["shape", "shape,colour"],
        help="the contrast's candidates: the object with every other shape, and also with every other colour",
    )
    p.add_argument("--contrast-batch", type=int, default=4, help="objects per step of the slot-contrast loss")
    p.add_argument(
        "--contrast-temperature",
        type=float,
        default=1.0,
        help="the slot-contrast logits are minus the summed squared error inside the mask over this",
    )
    p.add_argument(
        "--contrast-margin",
        type=float,
        default=None,
        help="a hinge instead of the cross-entropy: zero once every other slot's masked error is at least "
        "exp(MARGIN) times the own slot's (slot_contrast_loss)",
    )
    p.add_argument(
        "--contrast-own-only",
        action="store_true",
        help="the other slots' masked errors are constants: the slot contrast only lowers the own slot's error "
        "(slot_contrast_loss(own_only=True); the other candidates are denoised without a graph)",
    )
    p.add_argument(
        "--rows-words",
        default="heart",
        help="stage 'rows': the words whose input embedding rows are fine-tuned (comma-separated toy words)",
    )
    p.add_argument("--rows-steps", type=int, default=300, help="stage 'rows': optimiser steps")
    p.add_argument("--rows-batch", type=int, default=4, help="stage 'rows': objects per step")
    p.add_argument("--rows-lr", type=float, default=5e-4, help="stage 'rows': Adam learning rate")
    p.add_argument(
        "--rows-log-every",
        type=int,
        default=25,
        help="stage 'rows': steps between log lines and row snapshots",
    )
    p.add_argument(
        "--rows-contrast-weight",
        type=float,
        default=0.1,
        help="stage 'rows': weight of the slot contrast against the captions' plain MSE",
    )
    p.add_argument(
        "--compound-prob",
        type=float,
        default=0.0,
        help="share of captions given in the learning-prompt form, one summed-embedding slot per object "
        "(compound_conditioning)",
    )
    p.add_argument(
        "--snapshot-steps",
        default="",
        help="comma-separated steps at which the EMA UNet is also saved, as a diffusers folder "
        "<run-dir>/snapshots/step<N>",
    )
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--diag-every", type=int, default=500, help="steps between diagnostics (0: none)")
    p.add_argument("--diag-scenes", type=int, default=8)
    p.add_argument("--out", default=None, help="export the diffusers folder here")
    p.add_argument("--plot", default=None, help="with stage 'plot': write the loss curves PNG here")
    p.add_argument("--export-weights", default="ema", choices=["ema", "unet"])
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = Logger(run_dir)
    log(event="start", args=vars(args))
    if args.from_model:
        seed_from_model(run_dir, Path(args.from_model), log)
    stages = args.stages.split(",")
    for name in stages:
        if name == "vae":
            stage_vae(args, run_dir, log)
        elif name == "pool":
            stage_pool(args, run_dir, log)
        elif name == "clip":
            stage_clip(args, run_dir, log)
        elif name == "unet":
            stage_unet(args, run_dir, log)
        elif name == "rows":
            stage_rows(args, run_dir, log)
        elif name == "export":
            if args.out:
                export(run_dir, Path(args.out), args.export_weights)
                log(stage="export", out=args.out)
        elif name == "plot":
            plot_log(run_dir, Path(args.plot or run_dir / "loss.png"))
        else:
            raise SystemExit(f"unknown stage {name}")
    log(event="end")
