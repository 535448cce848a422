#!/usr/bin/env bash
# Rebuild the shipped toy model folder from research/rebuild/ and check its UNet byte for byte.
# The shipped (twentieth) UNet is the WiSE-FT average, weight by weight, of two committed UNets
# (docs/toyworld.md, "Twentieth run"):
#   research/rebuild/v11_unet            the eleventh model's UNet (research/recipes/train_eleventh_cpu.sh)
#   research/rebuild/v13_rerun_step386   the thirteenth trial's step-386 EMA snapshot, fine-tuned from the
#                                        eleventh model (research/recipes/train_contrast_cpu.sh)
# Steps: copy the shipped model folder, swap in the eleventh UNet's weights (the base: the eleventh model,
# fingerprint 887f090a733d), interpolate with the trial snapshot at alpha 0.5 into OUT_DIR, then compare
# OUT_DIR's UNet with the shipped one (cmp). The VAE, text encoder, tokenizer, scheduler and classifier are
# the shipped files, unchanged.
# Usage (from anywhere): bash research/recipes/rebuild_shipped_unet.sh OUT_DIR   (OUT_DIR must not exist)
set -euo pipefail
OUT=${1:?usage: rebuild_shipped_unet.sh OUT_DIR}
OUT=$(realpath -m "$OUT")
cd "$(dirname "$0")/../.."
MODEL=src/diffusers_conceptexpress/toyworld/model
WEIGHTS=diffusion_pytorch_model.safetensors
[ ! -e "$OUT" ] || { echo "$OUT exists; choose a new folder" >&2; exit 2; }
BASE=$(mktemp -d)
trap 'rm -rf "$BASE"' EXIT
cp -r "$MODEL" "$BASE/eleventh"
cp research/rebuild/v11_unet/$WEIGHTS "$BASE/eleventh/unet/$WEIGHTS"
"${PYTHON:-python}" -m research.toyworld_training.interpolate_unet --base "$BASE/eleventh" \
    --other research/rebuild/v13_rerun_step386 --alpha 0.5 --out "$OUT"
cmp "$OUT/unet/$WEIGHTS" "$MODEL/unet/$WEIGHTS"
diff -r "$OUT" "$MODEL"
echo "the rebuilt model folder $OUT equals the shipped one ($MODEL), its UNet byte for byte"
