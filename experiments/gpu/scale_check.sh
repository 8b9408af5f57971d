#!/usr/bin/env bash
# Issue 17's one prepared GPU script (not run yet: no GPU was lent to the sessions that wrote
# it). On a machine with CUDA and kd_nnp installed (`make install TORCH_SPEC=`), from the
# repository root:
#     bash experiments/gpu/scale_check.sh [OUT_DIR]
# Side by side in one run, on the GPU, each part with its own time limit so that one slow part
# cannot eat the others' budget (about 10 min on an H100 in all):
#   1. training step, model.backend=full vs lean, batch 8/16/32 of 52-100-atom frames,
#      energy + forces + stress: seconds per step and peak GPU memory (bench_lean.py);
#   2. the cached-feature builds (all atoms, M = 2/4/8 force atoms, strain) at ~50/100/200
#      atoms (run_all.py --only cache --device cuda);
#   3. relaxation of 8 test.db crystals with pretrained CHGNet: batched (8 per forward) vs one
#      crystal per forward (bench_batched_relax.py).
# Then writes OUT_DIR/summary.md from the JSON each part leaves. A part that fails or runs out
# of time is named in the summary; the others still run.
set -uo pipefail
OUT=${1:-${OUT:-outputs/gpu_scale}}
PY=${PY:-.venv/bin/python}
CODES=${CODES:-UREAXX02,OXALAC11,FORMAM,OXALAC02,NAPHTA15,BIPHEN,ACSALA,BENZEN}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    | tee "$OUT/device.txt" || exit 1
status=0
timeout 240 $PY experiments/bench/bench_lean.py --device cuda --batch-sizes 8,16,32 --steps 4 \
    --out "$OUT/lean" --json "$OUT/lean.json" > "$OUT/lean.log" 2>&1 || { echo "lean/full step: failed or timed out" >> "$OUT/failed.txt"; status=1; }
timeout 240 $PY experiments/bench/run_all.py --only cache --device cuda --out "$OUT/cache" \
    > "$OUT/cache.log" 2>&1 || { echo "cache build: failed or timed out" >> "$OUT/failed.txt"; status=1; }
timeout 180 $PY experiments/bench/bench_batched_relax.py --codes "$CODES" --device cuda --batch-size 8 \
    --json "$OUT/relax.json" > "$OUT/relax.log" 2>&1 || { echo "batched relaxation: failed or timed out" >> "$OUT/failed.txt"; status=1; }
$PY experiments/gpu/scale_summary.py "$OUT" | tee "$OUT/summary.md"
exit $status
