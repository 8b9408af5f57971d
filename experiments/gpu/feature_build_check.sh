#!/usr/bin/env bash
# The one prepared GPU check of issue 16 (not run yet: no GPU was lent to the session that
# wrote it). On a machine with CUDA and kd_nnp installed (`make install TORCH_SPEC=`), from the
# repository root:
#     bash experiments/gpu/feature_build_check.sh [OUT_DIR]
# It measures, side by side in one run, the cached-feature builds (all atoms, M = 2/4/8 force
# atoms, strain, M=4 + strain) of ~50/100/200-atom crystals on the GPU and on one CPU thread,
# and runs the quick cached force + stress training test on CUDA. About 5 min on an H100.
set -euo pipefail
OUT=${1:-${OUT:-outputs/gpu_check}}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$OUT/device.txt"
$PY experiments/bench/run_all.py --only cache --device cuda --out "$OUT/cuda" 2>&1 | tee "$OUT/cuda.log"
$PY experiments/bench/run_all.py --only cache --out "$OUT/cpu" 2>&1 | tee "$OUT/cpu.log"
# training on the GPU from cached subsampled forces + stress built on the GPU (quick demo data)
$PY -m kd_nnp.cli demo demo.quick=true demo.out="$OUT/demo_quick" trainer=gpu feature_device=cuda \
    model.compute_forces=true data.force_atoms=2 loss.r_sf=0.05 loss.r_ss=0.01 2>&1 | tee "$OUT/demo_quick.log"
