#!/usr/bin/env bash
# The prepared GPU check of issue 17's batched relaxation backend (not run yet: no GPU was lent
# to the session that wrote it). On a machine with CUDA and kd_nnp installed
# (`make install TORCH_SPEC=`), from the repository root:
#     bash experiments/gpu/batched_relax_check.sh [OUT_DIR]
# It relaxes 8 test.db crystals (16-84 atoms) with pretrained CHGNet on the GPU, batched (all 8
# per forward) and one crystal per forward, side by side in one run, and the same batched run
# on one CPU thread; it prints the seconds, the ratio and the largest relative difference of
# the final volumes (GPU vs GPU; the GPU-vs-CPU volumes are in the JSON files). A few minutes.
set -euo pipefail
OUT=${1:-${OUT:-outputs/gpu_check_relax}}
PY=${PY:-.venv/bin/python}
CODES=${CODES:-UREAXX02,OXALAC11,FORMAM,OXALAC02,NAPHTA15,BIPHEN,ACSALA,BENZEN}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$OUT/device.txt"
$PY experiments/bench/bench_batched_relax.py --codes "$CODES" --device cuda --batch-size 8 \
    --json "$OUT/cuda.json" 2>&1 | tee "$OUT/cuda.log"
OMP_NUM_THREADS=1 KD_NNP_THREADS=1 $PY experiments/bench/bench_batched_relax.py --codes "$CODES" \
    --device cpu --batch-size 8 --json "$OUT/cpu.json" 2>&1 | tee "$OUT/cpu.log"
