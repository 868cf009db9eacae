#!/usr/bin/env bash
# On a GPU machine (the device tool): install, run the tests that exercise GPU code, run the GPU
# benchmarks, and leave logs and recorded results under $OUT (default: gpu-out/).
#   bash bench/gpu_run.sh [all|tests|kernels|svd|stream]
# Each part fits one 10-minute device call; "all" (the default) may not: run the parts one by one
# on a tight budget. Every part installs first (the nvcc build of scoremerge._C is most of it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PART=${1:-all}
mkdir -p "$OUT"
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
  python3 -c "import cupy; print('cupy', cupy.__version__)"; nvcc --version; } > "$OUT/env.txt" 2>&1
start=$SECONDS
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || echo "install failed"
echo "install took $((SECONDS - start)) s" | tee -a "$OUT/install.log"

if [[ $PART == all || $PART == tests ]]; then
    python3 -m pytest -q tests/test_triton_kernels.py tests/test_ops.py tests/test_api.py \
        tests/test_methods_match_reference.py tests/test_mix.py tests/test_cuda_extension.py \
        tests/test_mix_kernel_on_host.py tests/test_online.py tests/test_arena.py \
        tests/test_cuda_linalg.py tests/test_linalg_gpu.py tests/test_streaming.py 2>&1 \
        | tee "$OUT/tests.txt" | tail -5
fi
if [[ $PART == all || $PART == kernels ]]; then
    python3 -m pytest -q bench/test_projection_gpu.py bench/test_mix_gpu.py bench/test_online.py \
        -s 2>&1 | tee "$OUT/bench_kernels.txt" | tail -60
fi
if [[ $PART == all || $PART == svd ]]; then
    python3 -m pytest -q bench/test_svd_gpu.py -s 2>&1 | tee "$OUT/bench_svd.txt" | tail -60
fi
if [[ $PART == all || $PART == stream ]]; then
    python3 -m pytest -q bench/test_streaming_gpu.py -s 2>&1 | tee "$OUT/bench_stream.txt" | tail -20
fi
cp bench/results/*gpu*.json bench/results/online_cuda.json "$OUT/" 2>/dev/null || true
