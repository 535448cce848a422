#!/usr/bin/env bash
# Go on training the shipped toy UNet on a lent GPU machine, in ONE `device` run (docs/toyworld.md,
# "Training on a GPU"). The device image has torch but not diffusers: carry its wheel in .whl/ (how: docs).
#
#   run(carry=[".whl"], timeout_s=600,
#       command="bash scripts/toyworld_device_train.sh 6 --unet-batch 256 --unet-lr 1e-3")
#
# Arguments: the UNet stage's wall-clock minutes, then any extra trainer options. Writes, under $OUT:
# train.log, log.jsonl and unet/ (the EMA weights, diffusers layout); install them here with
#   cp <files_at>/unet/* src/diffusers_conceptexpress/toyworld/model/unet/
# then measure with benchmarks/toyworld_diagnostics.py before shipping.
set -euo pipefail
MINUTES=${1:-6}
shift || true
OUT=${OUT:-/tmp/toyworld-device-out}
mkdir -p "$OUT/unet"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
MODEL=src/diffusers_conceptexpress/toyworld/model
RUN=/tmp/toyworld-run
rm -rf "$RUN"  # a fresh run from the shipped weights
DEVICE=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
python3 -m diffusers_conceptexpress.toyworld.train --run-dir "$RUN" --from-model "$MODEL" --unet-init "$MODEL" \
    --stages pool,unet,export --pool 12000 --threads "$(nproc)" --device "$DEVICE" --unet-arch attn-32-16 \
    --unet-weighting noise-level --unet-minutes "$MINUTES" --diag-every 2000 --out "$RUN/model" "$@" \
    2>&1 | tee "$OUT/train.log"
cp "$RUN/log.jsonl" "$OUT/"
cp "$RUN"/model/unet/* "$OUT/unet/"
