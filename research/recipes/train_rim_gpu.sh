#!/usr/bin/env bash
# The seventh toy-world UNet, trained on one GPU (session 8; docs/toyworld.md, "The rim world").
#   1. the rim model: the shipped sixth model fine-tuned on rim scenes (--rim 2) with the sixth run's recipe;
#   2. the self-attention grouping loss on top, two weights side by side, from the rim model's EMA weights.
# Every run writes EMA snapshots, diffusers UNet folders, to <run>/snapshots/step<N> (the last step too, when a
# time cap cuts a run short); pick one with research/probes/toyworld_diagnostics.py and the census, then copy its
# two files into src/diffusers_conceptexpress/toyworld/model/unet/ (the VAE and text encoder do not change).
#
# Usage: bash research/recipes/train_rim_gpu.sh [RUNS_DIR]
# Environment: DEVICE (cuda), THREADS (4, per run), POOL_WORKERS (1), V7_STEPS (1633), G_STEPS (3000), G_SNAPSHOTS
# (1000,2000,3000), GROUP_WEIGHTS ("0.5 0.25"), V7_MINUTES (3) and G_MINUTES (3): wall-clock caps.
set -euo pipefail
R=${1:-.toyworld-runs}
M=src/diffusers_conceptexpress/toyworld/model
TRAIN=(python3 -m research.toyworld_training)
RECIPE=(--pool 12000 --rim 2 --unet-arch attn-32-16 --unet-weighting noise-level --unet-lr 1e-3
    --eot-weight 0.2 --compound-prob 0.4 --coherence-weight 1.0 --coherence-distance 0.05
    --coherence-objects-only --diag-every 0 --threads "${THREADS:-4}" --device "${DEVICE:-cuda}" --pool-workers "${POOL_WORKERS:-1}")
V7_STEPS=${V7_STEPS:-1633}

"${TRAIN[@]}" --run-dir "$R/v7" --from-model $M --unet-init $M --stages pool,unet "${RECIPE[@]}" \
    --unet-steps "$V7_STEPS" --unet-minutes "${V7_MINUTES:-3}" --snapshot-steps "$V7_STEPS"

for G in ${GROUP_WEIGHTS:-0.5 0.25}; do
    D="$R/v7g$G"
    mkdir -p "$D"
    cp -r "$R/v7/pool.pt" "$R/v7/vae.pt" "$R/v7/clip.pt" "$R/v7/tokenizer" "$D/"  # same world, same encoders
    "${TRAIN[@]}" --run-dir "$D" --unet-init "$R/v7/unet.pt" --stages unet "${RECIPE[@]}" --group-weight "$G" \
        --unet-steps "${G_STEPS:-3000}" --unet-minutes "${G_MINUTES:-3}" \
        --snapshot-steps "${G_SNAPSHOTS:-1000,2000,3000}" &
done
wait
