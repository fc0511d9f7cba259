#!/usr/bin/env bash
# The GPU checks in one command (about 6 minutes on one H100/H200): the CUDA tests; our CLIP mode against
# open_clip's own RN50 and ViT-B-32 (train and forward-only evaluation, bf16, batch 128 and 256); the
# throughput/MFU benchmark of rn50 at 224 px (DeCLIP and CLIP modes) and of tiny and vitb32; an rn50 profile;
# and a few steps under the FSDP config on one GPU (the wrapping, sharded state and gathered weights).
# Results go to $OUT (as the device tool sets it), else $RESULTS, else runs/gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-${RESULTS:-runs/gpu_check}}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
# what the benchmark needs beside torch (best effort: the machine may have no network)
$PY -c "import accelerate, open_clip, safetensors, sklearn, scipy" 2>/dev/null \
    || $PY -m pip install -q -r requirements.txt 2>&1 | tail -n 3 | tee "$RESULTS/install.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$RESULTS/gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_data.py -k "gpu or cuda" 2>&1 | tail -n 30 | tee "$RESULTS/pytest.txt"
for B in 128 256; do
    $PY bench_declip.py --presets rn50 vitb32 --batch-size $B --precisions bf16 --modes clip --steps 15 --warmup 5 \
        --compare-open-clip --json "$RESULTS/open_clip_b$B.json" 2>&1 | tee -a "$RESULTS/open_clip.txt"
done
$PY bench_declip.py --presets rn50 --batch-size 128 --precisions bf16 --modes declip clip --steps 15 --warmup 5 \
    --json "$RESULTS/bench_rn50.json" 2>&1 | tee "$RESULTS/bench.txt"
$PY bench_declip.py --presets rn50 --batch-size 128 --precisions bf16 --modes declip --steps 15 --warmup 5 \
    --augment --json "$RESULTS/bench_rn50_augment.json" 2>&1 | tee -a "$RESULTS/bench.txt"
# where the rn50 step's time goes: the CUDA kernels that take the most time (for the MFU work)
$PY bench_declip.py --presets rn50 --batch-size 128 --precisions bf16 --modes declip --steps 5 --warmup 3 --profile \
    2>&1 | tee "$RESULTS/profile_rn50.txt" | tail -n 25
$PY bench_declip.py --presets tiny vitb32 --batch-size 256 --precisions bf16 --steps 15 --warmup 5 \
    --json "$RESULTS/bench_small.json" 2>&1 | tee -a "$RESULTS/bench.txt"
# FSDP2 with the shipped config on one process: generated JPEG photos, a few DeCLIP steps, resumable state
PHOTOS=$(mktemp -d)
$PY -c "import bench_declip as b; b.write_jpeg_photos('$PHOTOS', 512)" >/dev/null
accelerate launch --config_file configs/accelerate/fsdp_8gpu.yaml --num_processes 1 train_declip.py --model tiny \
    --data "$PHOTOS/meta.jsonl" --data-root "$PHOTOS" --batch-size 64 --max-steps 5 --no-eval \
    --out-dir "$PHOTOS/fsdp_run" 2>&1 | tail -n 5 | tee "$RESULTS/fsdp.txt"
ls "$PHOTOS/fsdp_run" | tee -a "$RESULTS/fsdp.txt"
