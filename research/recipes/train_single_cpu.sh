#!/usr/bin/env bash
# The ninth toy-world UNet trial (session 11; docs/toyworld.md, "Ninth run"): the shipped eighth model
# fine-tuned on the 2-core CPU with the eighth run's recipe plus SINGLE-CONCEPT captions: a share
# (--single-prob) of the batch is captioned "a photo of <x_k>" for ONE object k of its scene (the slot <x_k>
# is the sum of that object's word embeddings, as in --compound-prob) and its loss is masked to that object's
# latent cells: the method's own single-concept learning objective, with the object's true slot as the
# token. The extraction benchmark showed the learned tokens as the weak point (docs/benchmarks.md).
#
# Usage: bash research/recipes/train_single_cpu.sh [RUNS_DIR]   (STEPS, MINUTES, LR, SINGLE override the defaults)
# Needs the rim world's pool: an earlier run's (<RUNS_DIR>/v8b or v7 pool.pt) is linked when present;
# otherwise "pool," is added to --stages (a few minutes more; same pool, same seed).
# INIT: the model folder to start from (default: the shipped one, the eighth model).
set -euo pipefail
R=${1:-.toyworld-runs}
M=${INIT:-src/diffusers_conceptexpress/toyworld/model}
D="$R/v9"
mkdir -p "$D"
STAGES=unet
for src in "$R/v8b" "$R/v8" "$R/v7"; do
    if [ -f "$src/pool.pt" ] && [ ! -f "$D/pool.pt" ]; then
        cp -rl "$src/pool.pt" "$src/vae.pt" "$src/clip.pt" "$src/tokenizer" "$D/"
    fi
done
[ -f "$D/pool.pt" ] || STAGES=pool,unet
python -m research.toyworld_training --run-dir "$D" --from-model $M --unet-init $M --stages "$STAGES" \
    --pool 12000 --rim 2 --unet-arch attn-32-16 --unet-weighting noise-level --unet-lr "${LR:-3e-4}" --eot-weight 0.2 \
    --compound-prob 0.4 --single-prob "${SINGLE:-0.3}" --coherence-weight 1.0 --coherence-distance 0.05 \
    --coherence-objects-only --diag-every 0 --threads 2 --device cpu --group-weight 0.25 --separation-weight 0.5 \
    --separation-margin 1.0 --unet-steps "${STEPS:-400}" --unet-minutes "${MINUTES:-35}" --snapshot-steps 150,300,400
