#!/usr/bin/env bash
# The GPU checks in one command (about 3 minutes on one H100/H200): the CUDA tests, then the
# throughput/MFU benchmark of rn50 at 224 px (batch 128, bf16, DeCLIP and CLIP modes) and of tiny.
# Results go to $RESULTS (default runs/gpu_check): pytest.txt, bench.txt, bench_*.json, profile_rn50.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-runs/gpu_check}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_data.py -k "gpu or cuda" 2>&1 | tail -n 30 | tee "$RESULTS/pytest.txt"
$PY bench_declip.py --presets rn50 --batch-size 128 --precisions bf16 --modes declip clip --steps 15 --warmup 5 \
    --json "$RESULTS/bench_rn50.json" 2>&1 | tee "$RESULTS/bench.txt"
$PY bench_declip.py --presets rn50 --batch-size 128 --precisions bf16 --modes declip --steps 15 --warmup 5 \
    --augment --json "$RESULTS/bench_rn50_augment.json" 2>&1 | tee -a "$RESULTS/bench.txt"
# where the rn50 step's time goes: the CUDA kernels that take the most time (for the MFU work)
$PY bench_declip.py --presets rn50 --batch-size 128 --precisions bf16 --modes declip --steps 5 --warmup 3 --profile \
    2>&1 | tee "$RESULTS/profile_rn50.txt" | tail -n 25
$PY bench_declip.py --presets tiny vitb32 --batch-size 256 --precisions bf16 --steps 15 --warmup 5 \
    --json "$RESULTS/bench_small.json" 2>&1 | tee -a "$RESULTS/bench.txt"
