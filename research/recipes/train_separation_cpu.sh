#!/usr/bin/env bash
# The eighth toy-world UNet (session 9; docs/toyworld.md, "Eighth run"): the shipped seventh model fine-tuned
# on the 2-core CPU with the seventh run's recipe plus the self-attention SEPARATION loss (different objects'
# mean aggregated self-attention rows kept at least --separation-margin apart in symmetric KL), which the
# localization census showed missing (docs/benchmarks.md, "Where our masks lose generations").
#
# Usage: bash research/recipes/train_separation_cpu.sh [RUNS_DIR]   (about 25 minutes on 2 cores, ~4.9 s/step)
# Needs the rim world's pool: the seventh run's (<RUNS_DIR>/v7/pool.pt, from research/recipes/train_rim_gpu.sh) is
# copied when present; otherwise add "pool," to --stages (a few minutes more; same pool, same seed).
# INIT: the model folder to start from (default: the shipped one). The eighth model started from the seventh;
# to reproduce it after it shipped, build that folder first:
#   cp -r src/diffusers_conceptexpress/toyworld/model /tmp/v7 && for f in config.json diffusion_pytorch_model.safetensors;
#   do git show 24ae368:src/diffusers_conceptexpress/toyworld/model/unet/$f > /tmp/v7/unet/$f; done; INIT=/tmp/v7 bash ...
# Then copy <RUNS_DIR>/v8/snapshots/step<N>/* into src/diffusers_conceptexpress/toyworld/model/unet/.
set -euo pipefail
R=${1:-.toyworld-runs}
M=${INIT:-src/diffusers_conceptexpress/toyworld/model}
D="$R/v8"
mkdir -p "$D"
STAGES=unet
if [ -f "$R/v7/pool.pt" ]; then
    cp -r "$R/v7/pool.pt" "$R/v7/vae.pt" "$R/v7/clip.pt" "$R/v7/tokenizer" "$D/"
else
    STAGES=pool,unet
fi
python -m research.toyworld_training --run-dir "$D" --from-model $M --unet-init $M --stages "$STAGES" \
    --pool 12000 --rim 2 --unet-arch attn-32-16 --unet-weighting noise-level --unet-lr 1e-3 --eot-weight 0.2 \
    --compound-prob 0.4 --coherence-weight 1.0 --coherence-distance 0.05 --coherence-objects-only --diag-every 0 \
    --threads 2 --device cpu --group-weight 0.25 --separation-weight 0.5 --separation-margin 1.0 \
    --unet-steps "${STEPS:-600}" --unet-minutes "${MINUTES:-25}" --snapshot-steps 150,300,450,600
