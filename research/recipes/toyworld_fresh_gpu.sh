#!/usr/bin/env bash
# The toy-world benchmark on FRESH scenes, on one GPU: seeds 50,000-50,019 (no choice of the shipped model or
# of any schedule was made on them; never tune on them). WORKERS processes share the (scene, variant) pairs
# with --claim and stop after BUDGET seconds; then the scenes with every variant recorded are summarised and
# their records packed. Usage: bash research/recipes/toyworld_fresh_gpu.sh OUT_DIR [extra benchmark flags]
# RECORDS (default $ROOT/records, lost with the machine) may name a folder of the work tree, e.g.
# benchmarks/results/toyworld_fresh: its committed zips are unpacked first, so a run resumes the scenes an
# earlier session recorded (commit the zips it leaves in OUT_DIR there before the next session).
set -uo pipefail
OUT=${1:?usage: toyworld_fresh_gpu.sh OUT_DIR}
shift
WORKERS=${WORKERS:-8}
BUDGET=${BUDGET:-420}
ROOT=${FRESH_ROOT:-/tmp/toyworld-fresh}
mkdir -p "$OUT" "$ROOT"
ARGS=(--seed-start 50000 --scenes "${SCENES:-20}" --parts extraction --device "${DEVICE:-cuda}" --threads 1
  --variants fast_our-masks,fast_GT-masks,faithful_our-masks,faithful_GT-masks
  --records "${RECORDS:-$ROOT/records}" --work "$ROOT/work" "$@")
for i in $(seq "$WORKERS"); do
  timeout "$BUDGET" "${PYTHON:-python}" benchmarks/toyworld.py "${ARGS[@]}" --claim >"$ROOT/worker$i.log" 2>&1 &
done
wait
cat "$ROOT"/worker*.log | grep -v "it/s\]" >"$OUT/workers.log"
"${PYTHON:-python}" benchmarks/toyworld.py "${ARGS[@]}" --summarize-only --pack --out "$OUT/toyworld_fresh.json" >"$OUT/summary.md" 2>>"$OUT/workers.log"
cp "${RECORDS:-$ROOT/records}"/*/*.zip "$OUT/"
