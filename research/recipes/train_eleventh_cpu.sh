#!/usr/bin/env bash
# The eleventh toy UNet (session 14; docs/toyworld.md, "Eleventh run"), from the seventh model,
# on the 2-core CPU, in two stages of research/recipes/train_stripes_cpu.sh on the fourth world (lighter stripes):
#   1. the tenth-run trial: 429 steps of the seventh run's recipe on the new world (session 12; its run
#      stopped at 429 steps on its 35-minute cap, here bounded by steps);
#   2. a fine-tune of that trial with the eighth run's separation loss (weight 0.5, margin 1.0): 300 steps,
#      EMA snapshots at 100, 200 and 300; the step-200 snapshot was the eleventh model's UNet (our localizer's
#      count on the benchmark's 50 scenes: 92% at step 200, 82% at step 300). Its committed weights are
#      research/rebuild/v11_unet, the base of the shipped (twentieth) UNet: research/recipes/rebuild_shipped_unet.sh.
# Usage: bash research/recipes/train_eleventh_cpu.sh [RUNS_DIR]   (about 35 + 20 minutes of UNet steps, plus two pools)
# Writes RUNS_DIR/eleventh/model (a diffusers folder; compare or copy its unet/ into toyworld/model/unet).
# Training is not bit-for-bit deterministic across machines and thread counts; the result is a model of the
# same recipe, not the same bytes.
set -euo pipefail
R=${1:-.toyworld-runs}
W="$R/eleventh"
mkdir -p "$W"
# the seventh model (shipped before session 9), from git
rm -rf "$W/seventh" && mkdir -p "$W/seventh"
git archive f2afe38^ src/diffusers_conceptexpress/toyworld/model | tar -x -C "$W/seventh"
SEVENTH="$W/seventh/src/diffusers_conceptexpress/toyworld/model"

RUN=eleventh-a INIT="$SEVENTH" STEPS=429 MINUTES=240 bash research/recipes/train_stripes_cpu.sh "$R"
rm -rf "$W/trial" && cp -r "$SEVENTH" "$W/trial"
cp "$R/eleventh-a/snapshots/step429/"* "$W/trial/unet/"

mkdir -p "$R/eleventh-b" && cp "$R/eleventh-a/pool.pt" "$R/eleventh-b/"  # same world: reuse the pool
RUN=eleventh-b INIT="$W/trial" STEPS=300 MINUTES=240 \
    EXTRA="--separation-weight 0.5 --separation-margin 1.0 --snapshot-steps 100,200,300" \
    bash research/recipes/train_stripes_cpu.sh "$R"
rm -rf "$W/model" && cp -r "$W/trial" "$W/model"
cp "$R/eleventh-b/snapshots/step200/"* "$W/model/unet/"
echo "model: $W/model"
