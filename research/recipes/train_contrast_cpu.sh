#!/usr/bin/env bash
# Thirteenth toy-world UNet trial (session 20; docs/toyworld.md, "Thirteenth run"): the shape-contrast loss.
# On the shipped eleventh model a heart's pixels are explained better (by the method's masked loss) by the
# one-slot prompt "colour + circle" or "colour + square" than by "colour + heart", so the learned tokens of
# hearts draw circles and squares (docs/toyworld.md, eleventh model, items 4 and 6). slot_contrast_loss asks
# the UNet to rank an object's own slot first among the six shapes of its colour and texture, by the summed
# squared error inside the object's latent mask (same noisy latent and noise for every candidate).
# A fine-tune of the shipped eleventh model with its own recipe (the tenth trial's plus the separation loss) on
# the fourth world (the shipped one), plus --contrast-weight; 2-core CPU.
# Usage: bash research/recipes/train_contrast_cpu.sh [RUNS_DIR]   -> RUNS_DIR/v13/snapshots/step<N>/ (UNet folders)
#   (RUN, STEPS, MINUTES, WEIGHT, SWAP, BATCH, MARGIN (the hinge form), OWN=1 (--contrast-own-only) override the
#   defaults; the fourteenth trial, with colour candidates too (session 21, 418 steps; worse: docs/toyworld.md, "Fourteenth run"):
#   RUN=v14 SWAP=shape,colour BATCH=2 bash research/recipes/train_contrast_cpu.sh; session 22's fifteenth trial, the hinge:
#   RUN=v15 MARGIN=0.5 bash research/recipes/train_contrast_cpu.sh, and sixteenth, the own slot only:
#   RUN=v16 OWN=1 MINUTES=36 bash research/recipes/train_contrast_cpu.sh; docs/toyworld.md, "Fifteenth run" and after;
#   TEACHER=1 (--unet-target teacher): the denoising target is the starting (shipped) UNet's own prediction, so the
#   fine-tune keeps the shipped function where the contrast does not move it; session 24's eighteenth trial:
#   RUN=v18 TEACHER=1 MINUTES=40 bash research/recipes/train_contrast_cpu.sh, docs/toyworld.md, "Eighteenth run";
#   TRAIN=<names> (--unet-train) trains only those UNet parameters; the nineteenth trial, the cross-attention's
#   keys and values alone: RUN=v19 TEACHER=1 TRAIN=attn2.to_k,attn2.to_v LR=1e-3 MINUTES=40 bash research/recipes/train_contrast_cpu.sh)
# Session 20: a first attempt with WEIGHT=0.1 raised the denoising loss from 0.045 to 0.064 in 200 steps and was
# stopped (its log, benchmarks/results/toyworld_v13_trial/train_log_w0.1.jsonl, is in git history, e.g. at
# commit 91cee24); the trial is the run with the defaults below (RUN=v13b there, with the first attempt's pool):
# 386 steps in the 45-minute cap (7 s per step). Its step-386 snapshot, rerun, is research/rebuild/v13_rerun_step386.
set -euo pipefail
RUN=${RUN:-v13} STEPS=${STEPS:-600} MINUTES=${MINUTES:-45} \
    EXTRA="--separation-weight 0.5 --separation-margin 1.0 --contrast-weight ${WEIGHT:-0.02} \
        --contrast-swap ${SWAP:-shape} --contrast-batch ${BATCH:-4} ${MARGIN:+--contrast-margin $MARGIN} ${OWN:+--contrast-own-only} \
        ${TEACHER:+--unet-target teacher} ${TRAIN:+--unet-train $TRAIN}" \
    bash research/recipes/train_stripes_cpu.sh "${1:-.toyworld-runs}"
