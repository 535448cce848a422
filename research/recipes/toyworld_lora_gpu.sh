#!/usr/bin/env bash
# Issue 41's quality acceptance on FRESH scenes, on one GPU: seeds 50,000-50,019 (no choice of the shipped model,
# of any schedule or of the LoRA phase was made on them; never tune on them), our masks, fast schedule. ONE
# extraction per scene with the LoRA phase (benchmarks/toyworld_lora.py): its token phase is the extraction
# without it, so "tokens alone" and "with LoRA" come from the same run, with the editability reads (48 plain
# prompts x 2 images with the scene's LoRA, the same on the base model once, "<ce>_k and a <colour> <shape>").
# WORKERS processes share the scenes with --claim and stop after BUDGET seconds; then the scenes done are
# summarised (OUT_DIR/toyworld_lora_fresh.json, summary.txt) and their per-scene JSON copied to OUT_DIR/scenes/.
#
# Usage (repository root, PYTHONPATH=src or the package installed):
#   WORKERS=20 BUDGET=480 bash research/recipes/toyworld_lora_gpu.sh OUT_DIR [extra toyworld_lora.py flags]
# Estimate (H200, toy model launch-bound): a fast extraction took 95-165 s with 12 processes sharing the GPU
# (docs/benchmarks.md, "Fresh scenes"); the LoRA phase adds at most 0.6x of it (the CPU cost figure,
# docs/benchmarks.md), the generations ~10-20 s per scene: 20 scenes in one round of 20 workers should take
# 250-400 s on 16 cores. A rerun with the same ROOT resumes (finished scenes are skipped).
set -uo pipefail
OUT=${1:?usage: toyworld_lora_gpu.sh OUT_DIR}
shift
WORKERS=${WORKERS:-20}
BUDGET=${BUDGET:-480}
ROOT=${LORA_ROOT:-/tmp/toyworld-lora}
mkdir -p "$OUT/scenes" "$ROOT"
ARGS=(--seed-start 50000 --scenes "${SCENES:-20}" --device "${DEVICE:-cuda}" --threads 1 --work "$ROOT/work" "$@")
for i in $(seq "$WORKERS"); do
  timeout "$BUDGET" "${PYTHON:-python}" benchmarks/toyworld_lora.py "${ARGS[@]}" --claim >"$ROOT/worker$i.log" 2>&1 &
done
wait
cat "$ROOT"/worker*.log | grep -v "it/s\]" >"$OUT/workers.log"
"${PYTHON:-python}" benchmarks/toyworld_lora.py "${ARGS[@]}" --summarize-only --out "$OUT/toyworld_lora_fresh.json" \
  >"$OUT/summary.txt" 2>>"$OUT/workers.log"
find "$ROOT/work" -name "5*.json" -exec cp {} "$OUT/scenes/" \;
cat "$OUT/summary.txt"
