#!/usr/bin/env bash
# Tenth toy-world UNet trial (session 12; docs/toyworld.md, "Tenth run"): the fourth world, whose striped
# objects have LIGHTER dark bands (--stripe-shade 0.8 instead of 0.55), so that the rim (35% of the colour)
# stays the only dark line inside an object and its outline shows through the stripes. On the shipped
# eighth model, striped objects were drawn right in 12% of GT-mask extraction generations against 75% for
# plain ones, and "a photo of a red striped circle" itself in 64% (docs/benchmarks.md).
#
# Usage: INIT=<model folder> bash research/recipes/train_stripes_cpu.sh [RUNS_DIR]
#   (RUN, STEPS, MINUTES, LR, SHADE, RIM, EXTRA override the defaults; RIM is the rim width in pixels (2); EXTRA adds trainer options, e.g.
#   "--separation-weight 0.5 --separation-margin 1.0" for the eighth run's recipe)
# INIT: the model folder to start from (default: the shipped one). Session 12 started from the seventh model:
#   git archive f2afe38^ src/diffusers_conceptexpress/toyworld/model | tar -x -C /tmp/x
# The pool of the new world is built first (12,000 scenes, a few minutes with two workers).
# A finished run resumes (same optimiser state, EMA and pool) when called again with a larger budget: session 13
# continued session 12's 429 steps to 944 with
#   INIT=<seventh model> STEPS=1200 MINUTES=83 EXTRA="--snapshot-steps 600,750,900,1050" bash research/recipes/train_stripes_cpu.sh
# (MINUTES counts the whole run's UNet time, session 12's 35 minutes included).
set -euo pipefail
R=${1:-.toyworld-runs}
M=${INIT:-src/diffusers_conceptexpress/toyworld/model}
D="$R/${RUN:-v10}"  # RUN names another run (copy v10/pool.pt there to skip the pool)
mkdir -p "$D"
# shellcheck disable=SC2086
python -m research.toyworld_training --run-dir "$D" --from-model $M --unet-init $M --stages pool,unet \
    --pool 12000 --pool-workers 2 --rim "${RIM:-2}" --stripe-shade "${SHADE:-0.8}" --unet-arch attn-32-16 \
    --unet-weighting noise-level --unet-lr "${LR:-3e-4}" --eot-weight 0.2 --compound-prob 0.4 --coherence-weight 1.0 \
    --coherence-distance 0.05 --coherence-objects-only --diag-every 0 --threads 2 --device cpu --group-weight 0.25 \
    --unet-steps "${STEPS:-600}" --unet-minutes "${MINUTES:-35}" --snapshot-steps 150,300,450,600 ${EXTRA:-}
