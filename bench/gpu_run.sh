#!/usr/bin/env bash
# One call on a GPU machine (the device tool): install, run the tests that exercise GPU code,
# run the GPU benchmarks, and leave logs and recorded results under $OUT (default: gpu-out/).
#   bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } \
    > "$OUT/env.txt" 2>&1
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || echo "install failed"
python3 -m pytest -q tests/test_triton_kernels.py tests/test_ops.py tests/test_api.py \
    tests/test_methods_match_reference.py 2>&1 | tee "$OUT/tests.txt" | tail -5
python3 -m pytest -q bench/test_projection_gpu.py -s 2>&1 | tee "$OUT/bench.txt" | tail -40
cp bench/results/*gpu*.json "$OUT/" 2>/dev/null || true
