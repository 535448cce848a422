#!/usr/bin/env bash
# Seventeenth toy-world trial (session 23; docs/toyworld.md, "Seventeenth run"): the heart's word row alone.
# On the shipped eleventh model a heart's pixels are explained better by the one-slot prompt "colour + circle"
# than by "colour + heart" (docs/toyworld.md, eleventh model, items 4 and 6), so the learned tokens of hearts
# draw circles. The UNet trials that ranked the own slot first (thirteenth to sixteenth runs) also moved
# other objects' colours. The trainer's "rows" stage fine-tunes the input embedding row of "heart" ALONE
# (UNet, text encoder and every other row frozen): the slot contrast over the six shapes plus the captions'
# plain denoising loss, gradients through the frozen text encoder. Prompts without "heart" are unchanged.
# Result (session 23): the heart slot ranks first, but no extraction changes: a learned token never reads a
# word row (docs/toyworld.md, "Seventeenth run").
# Usage: bash research/recipes/train_rows_cpu.sh [RUNS_DIR]   -> RUNS_DIR/$RUN/rows.pt (and snapshots/rows_step<N>.pt)
#   (RUN, WORDS, STEPS, BATCH, LR, WEIGHT override the defaults; copy or link another run's pool.pt into the
#   run folder to skip the pool, 12,000 scenes of the shipped world)
# Then a model folder: the shipped one with the run's text encoder (export applies rows.pt):
#   python -m research.toyworld_training --run-dir RUNS_DIR/$RUN --unet-init <shipped> \
#     --unet-arch attn-32-16 --stages unet,export --unet-steps 0 --diag-every 0 --out <folder>
set -euo pipefail
R=${1:-.toyworld-runs}
M=src/diffusers_conceptexpress/toyworld/model
D="$R/${RUN:-r1}"
mkdir -p "$D"
python -m research.toyworld_training --run-dir "$D" --from-model $M --unet-init $M --stages pool,rows \
    --pool 12000 --pool-workers 2 --rim 2 --stripe-shade 0.8 --unet-arch attn-32-16 --threads 1 \
    --rows-words "${WORDS:-heart}" --rows-steps "${STEPS:-300}" --rows-batch "${BATCH:-4}" --rows-lr "${LR:-5e-4}" \
    --rows-contrast-weight "${WEIGHT:-0.1}"
