#!/usr/bin/env bash
# Issue 42 in ONE device call (one H200, 16 cores; prepared in session 33, when no machine was lent):
# - benchmarks/gpu.py on the GPU, one family at a time (nothing else uses the GPU meanwhile);
# - CPU workers (one thread each) extract the fresh scenes CPU_START.. (CPU_SCENES of them) with all four
#   variants of the quality comparison: CPU_FAITHFUL take the faithful records (6-8 minutes each on one
#   core), CPU_TURBO the turbo ones (about 2 minutes with the generations);
# - once gpu.py is done, GPU_WORKERS take the fresh scenes GPU_START.. (GPU_SCENES), faithful first.
# Keep the two ranges apart (and the starts even: a scene's object count follows its index), so that every
# variant of a scene runs on one device. The records committed in RECORDS are unpacked first, so scenes
# already recorded are skipped. Every worker stops DEADLINE seconds after the start (a record not finished by
# then is lost, none is half written); the records are packed into OUT (one zip per variant, committed ones
# included: commit them into RECORDS/<fingerprint>/) and read on the CPU (docs/benchmarks.md, "Fresh scenes:
# turbo against faithful").
# Usage (repository root, the package importable): bash research/recipes/issue42_device_call.sh OUT
# Smoke test on a CPU: DEADLINE=120 CPU_FAITHFUL=0 CPU_TURBO=1 GPU_WORKERS=0 GPU_ARGS="--device cpu --tiny"
#   EXTRA="--steps 4 --samples 1 --inference-steps 2" bash research/recipes/issue42_device_call.sh /tmp/smoke
set -uo pipefail
OUT=${1:?usage: issue42_device_call.sh OUT}
DEADLINE=${DEADLINE:-520}
ROOT=${FRESH_ROOT:-/tmp/fresh42}
RECORDS=${RECORDS:-benchmarks/results/toyworld_fresh}
PY=${PYTHON:-python}
mkdir -p "$OUT" "$ROOT" "$RECORDS"
start=$(date +%s)
left() { echo $((DEADLINE - ($(date +%s) - start))); }
FAITHFUL=faithful_our-masks,faithful_GT-masks
TURBO=turbo_our-masks,turbo_GT-masks
COMMON=(benchmarks/toyworld.py --parts extraction --threads 1 --records "$RECORDS" --work "$ROOT/work" --claim ${EXTRA:-})
{ nproc; lscpu | grep -i "model name"; nvidia-smi -L; } >"$ROOT/machine.log" 2>&1
$PY - "$RECORDS" $FAITHFUL,$TURBO <<'EOF' >>"$ROOT/machine.log" 2>&1
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from toyworld import unpack_records
for fp in Path(sys.argv[1]).iterdir():
    for variant in sys.argv[2].split(","):
        print(fp.name, variant, "unpacked", unpack_records(fp, variant))
EOF
for i in $(seq "${CPU_FAITHFUL:-12}"); do
  timeout "$(left)" $PY "${COMMON[@]}" --seed-start "${CPU_START:-50000}" --scenes "${CPU_SCENES:-6}" --device cpu --variants $FAITHFUL \
    >"$ROOT/cpu_faithful$i.log" 2>&1 &
done
for i in $(seq "${CPU_TURBO:-3}"); do
  timeout "$(left)" $PY "${COMMON[@]}" --seed-start "${CPU_START:-50000}" --scenes "${CPU_SCENES:-6}" --device cpu --variants $TURBO \
    >"$ROOT/cpu_turbo$i.log" 2>&1 &
done
for family in sd21 sdxl; do
  timeout "${GPU_SCRIPT_LIMIT:-200}" $PY benchmarks/gpu.py ${GPU_ARGS:-} --families $family --out "$OUT/gpu_$family.json" \
    >"$ROOT/gpu_$family.log" 2>&1
  echo "gpu.py $family: rc $? at $(($(date +%s) - start)) s" >>"$ROOT/machine.log"
done
for i in $(seq "${GPU_WORKERS:-2}"); do
  timeout "$(left)" $PY "${COMMON[@]}" --seed-start "${GPU_START:-50014}" --scenes "${GPU_SCENES:-6}" --device cuda --variants $FAITHFUL,$TURBO \
    >"$ROOT/gpu_worker$i.log" 2>&1 &
done
wait
echo "workers done at $(($(date +%s) - start)) s" >>"$ROOT/machine.log"
$PY - "$RECORDS" "$OUT" $FAITHFUL,$TURBO <<'EOF' >>"$ROOT/machine.log" 2>&1
import shutil, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from toyworld import pack_records
for fp in Path(sys.argv[1]).iterdir():
    for variant in sys.argv[3].split(","):
        archive = pack_records(fp, variant)
        print(fp.name, variant, archive)
        if archive is not None:
            shutil.copy(archive, Path(sys.argv[2]) / f"{variant}.zip")
EOF
for f in "$ROOT"/*.log; do echo "== $(basename "$f")"; grep -v "it/s\]" "$f" | grep -v "^\[transformers\]\|should be kept in float32" | tail -40; done >"$OUT/logs.txt"
