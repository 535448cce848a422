#!/usr/bin/env bash
# Issue 41's quality acceptance on FRESH scenes, on one GPU: seeds 50,000-50,019 (no choice of the shipped model,
# of any schedule or of the LoRA phase was made on them; never tune on them), our masks, fast schedule. ONE
# extraction per scene with the LoRA phase (benchmarks/toyworld_lora.py): its token phase is the extraction
# without it, so "tokens alone" and "with LoRA" come from the same run, with the editability reads (48 plain
# prompts x 2 images with the scene's LoRA, the same on the base model once, "<ce>_k and a <colour> <shape>").
# WORKERS processes share the scenes with --claim and stop after BUDGET seconds; then the scenes done are
# summarised (OUT_DIR/toyworld_lora_fresh.json, summary.txt) and the work folder (per-scene JSON, the base
# model's plain reads) zipped to OUT_DIR/work.zip (one file: a device call returns at most 8).
#
# Usage (repository root, PYTHONPATH=src or the package installed):
#   WORKERS=20 BUDGET=540 bash research/recipes/toyworld_lora_gpu.sh OUT_DIR [extra toyworld_lora.py flags]
# Measured (one H200, 16 cores, 2026-12-04): 20 workers finished the 20 scenes in 523 s, 340-431 s per
# extraction (docs/benchmarks.md, "LoRA phase"; its records: the committed zip of OUT_DIR/work.zip). A rerun
# with the same ROOT resumes (finished scenes are skipped).
set -uo pipefail
OUT=${1:?usage: toyworld_lora_gpu.sh OUT_DIR}
shift
WORKERS=${WORKERS:-20}
BUDGET=${BUDGET:-540}
ROOT=${LORA_ROOT:-/tmp/toyworld-lora}
mkdir -p "$OUT" "$ROOT" && OUT=$(cd "$OUT" && pwd)
ARGS=(--seed-start 50000 --scenes "${SCENES:-20}" --device "${DEVICE:-cuda}" --threads 1 --work "$ROOT/work" "$@")
for i in $(seq "$WORKERS"); do
  timeout "$BUDGET" "${PYTHON:-python}" benchmarks/toyworld_lora.py "${ARGS[@]}" --claim >"$ROOT/worker$i.log" 2>&1 &
done
wait
cat "$ROOT"/worker*.log | grep -v "it/s\]" >"$OUT/workers.log"
"${PYTHON:-python}" benchmarks/toyworld_lora.py "${ARGS[@]}" --summarize-only --out "$OUT/toyworld_lora_fresh.json" \
  >"$OUT/summary.txt" 2>>"$OUT/workers.log"
(cd "$ROOT/work" && "${PYTHON:-python}" -m zipfile -c "$OUT/work.zip" .)
cat "$OUT/summary.txt"
