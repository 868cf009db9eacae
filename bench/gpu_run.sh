#!/usr/bin/env bash
# The project's whole GPU verification in one device call: install with the nvcc build
# of scoremerge._C, `scoremerge doctor` (the verdict), the GPU tests that matter most, then the GPU
# benchmarks in priority order. Each part runs under `timeout`, so a slow one cannot starve the
# ones after it, and everything lands in $OUT (default gpu-out/), with a one-screen summary
# printed last.
#
#     bash bench/gpu_run.sh                 # ~7.5 minutes on an H200, install included
#     bash bench/gpu_run.sh tests mix       # a rerun of some parts (after the install)
#
# Time: GPU_RUN_BUDGET_S (default 450 s: the 8-minute call less margin) covers every part. A
# part's time box is its own cap or what is left of the budget before the summary, whichever is
# less; a part left under MIN_S is skipped and the summary says so. pytest parts are stopped with
# SIGINT, so their fixtures still write the rows measured so far.
# The GPU estimates below are reasoned, not measured: no GPU run has happened yet. Each says
# what it rests on; the CPU-side parts (the nvcc build, Triton's sm_90 compiles, doctor on a
# CPU) were timed on the 2-core development machine.
#
# $OUT holds at most 8 files, what the device tool returns: summary.txt, env.txt (machine,
# versions, install log), doctor.txt, doctor.json, tests.txt, bench.txt (every benchmark's
# output) and results.tgz (the bench/results/*.json each benchmark wrote, renamed by part).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
# Parts to run (environment and install always run): doctor tests projection svd_polar
# score_merge mix stream online doctor_bench, or all.
SELECTED=" ${*:-all} "
BUDGET=${GPU_RUN_BUDGET_S:-450}
SUMMARY_S=15            # kept back for the summary and the archive
MIN_S=20
STAGE=$(mktemp -d)      # results renamed by part, archived into $OUT/results.tgz at the end
mkdir -p "$OUT"
rm -f "$OUT"/{summary.txt,env.txt,doctor.txt,doctor.json,tests.txt,bench.txt,results.tgz}
STATUS="$STAGE/status.txt"
: > "$STATUS"
export PYTHONUNBUFFERED=1
# The H200 runs sm_90 code: building 80 too would add a third of the nvcc time for nothing here
# (CI builds the default 80;90 on every install).
export SCOREMERGE_CUDA_ARCHS=${SCOREMERGE_CUDA_ARCHS:-90}

# part NAME CAP_S ESTIMATE_S LOG FUNCTION: run FUNCTION under its time box, log to LOG, and add
# one status line. FUNCTION sees the box as $BOX (benchmarks with their own budget use it).
part() {
    local name=$1 cap=$2 estimate=$3 log=$4 fn=$5
    case $SELECTED in
        " all " | *" $name "*) ;;
        *) [[ $name == environment || $name == install ]] || return 0 ;;
    esac
    local left=$((BUDGET - SUMMARY_S - SECONDS))
    local box=$((cap < left ? cap : left))
    if ((box < MIN_S)); then
        printf '%-16s skipped: %ss of the budget left (estimate %ss)\n' \
            "$name" "$left" "$estimate" >> "$STATUS"
        return
    fi
    local start=$SECONDS rc
    touch "$STAGE/.started"
    printf '\n==== %s: time box %ss, estimate %ss ====\n' "$name" "$box" "$estimate" >> "$log"
    BOX=$box timeout -s INT -k 15 "$box" bash -c "$fn" >> "$log" 2>&1
    rc=$?
    local how="exit $rc"
    ((rc == 0)) && how="ok"
    ((rc == 124 || rc == 137)) && how="TIMED OUT"
    printf '%-16s %-10s %4ss of a %ss box (estimate %ss)\n' \
        "$name" "$how" "$((SECONDS - start))" "$box" "$estimate" >> "$STATUS"
}

stage() {   # stage RESULT NAME: keep the bench/results JSON the last part wrote, by part name
    if [[ bench/results/$1.json -nt $STAGE/.started ]]; then
        cp "bench/results/$1.json" "$STAGE/$2.json"
    fi
}

PYTEST="python3 -m pytest -q -p no:cacheprovider"

# Machine and versions: ~5 s.
environment() {
    nvidia-smi; nproc; free -g; df -h /tmp .
    python3 -c "import sys, torch, triton; print(sys.version)
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
print('triton', triton.__version__)"
    python3 -c "import cupy; print('cupy', cupy.__version__)"
    python3 -c "import xdist; print('pytest-xdist', xdist.__version__)"
    nvcc --version
}
# Install: ~35 s. The nvcc build took 79 s wall (49 s CPU) on the 2-core development machine for
# sm_80 + sm_90 + PTX; sm_90 + PTX alone is about 2/3 of that work, and nvcc's --threads 0 runs
# the targets of each file side by side on the H200 host's 16 cores; pip adds ~10 s.
install_package() {
    python3 -m pip install --no-build-isolation --no-deps -e . && python3 -c "
from scoremerge.backend import cuda
print('scoremerge._C:', cuda.extension())"
}
# The verdict: ~40 s. On the CPU doctor takes 3 s; on the GPU add Triton's compiles of ~60 kernel
# variants (18 compiled for sm_90 in 2.3 s here, so well under a second each) and the
# autotuner's trial runs (5 tile configs per GEMM shape, ~20 shapes, ~0.1 s each).
doctor() {
    python3 -m scoremerge doctor --json "$OUT/doctor.json"
}
# The GPU tests that matter most: ~100 s. The CUDA SVD and polar factor (float64 CPU references
# of ViT-B-sized matrices dominate), the Triton kernels compiled for real (3xTF32 precision
# included), both CUDA mix paths, the GPU streaming (TIES in spans too) and online merges against
# the CPU. Four xdist workers where pytest-xdist is present (the image has it); compile-only tests
# left out.
gpu_tests() {
    local workers=""
    python3 -c "import xdist" 2>/dev/null && workers="-n 4"
    OMP_NUM_THREADS=4 $PYTEST $workers -rfE --durations=15 -k "not compiles" \
        tests/test_linalg_gpu.py tests/test_triton_kernels.py tests/test_mix.py \
        tests/test_cuda_extension.py \
        tests/test_streaming.py::test_streaming_on_a_gpu_agrees_with_the_cpu \
        tests/test_ties_in_spans.py::test_on_a_gpu_the_spans_agree_with_the_cpu \
        tests/test_online.py::test_on_a_gpu_the_merger_agrees_with_the_cpu
}
# Projection+mask and reconstruction against torch on the 7B layer group: ~45 s. Nine cases, each
# an autotune over 5 tiles on 4096-wide GEMMs (~1 s) and 3 interleaved rounds of ~0.1 s calls.
bench_projection() {
    SCOREMERGE_BENCH_CASES=llm_7b $PYTEST -s bench/test_projection_gpu.py
}
# Truncated SVD and polar against torch.linalg on the ViT-B batches: ~75 s, held to the box by
# the file's own budget (a part that would not fit is skipped with a row saying so).
bench_svd() {
    SCOREMERGE_BENCH_BUDGET_S=$((BOX - 15)) $PYTEST -s bench/test_svd_gpu.py \
        -k "vit_b16 and not score_merge"
}
# A ViT-B/16 SCORE merge against the per-key reference: ~50 s, mostly the reference's ~340
# torch.linalg.svd calls on 768-wide matrices (~0.1 s each) and float64 errors on the CPU.
bench_merge() {
    SCOREMERGE_BENCH_BUDGET_S=$((BOX - 15)) $PYTEST -s bench/test_svd_gpu.py -k score_merge_vit_b16
}
# Mixing bandwidth against the copy bandwidth: ~30 s for N = 10M and 1B, K = 4 and 16, fp32 and
# bf16 (each timing moves ~20 GB, ~5 ms at 4 TB/s; filling the 1B arenas costs most) and the
# ViT-B arena against per-parameter loops.
bench_mix() {
    SCOREMERGE_BENCH_MIX_N=10000000,1000000000 SCOREMERGE_BENCH_MIX_K=4,16 \
        $PYTEST -s bench/test_mix_gpu.py
}
# The 2-layer 7B streaming SCORE merge (T = 4) against reading its inputs: ~60 s: writing the
# five ~0.8 GB checkpoints, one read pass, the merge (its SVDs through cuSOLVER).
bench_stream() {
    $PYTEST -s bench/test_streaming_gpu.py
}
# OnlineMerger per batch on the GPU, the paper's reading and every strategy (the default
# included) on the demo model and a ViT-B/16-shaped one, fp32 and bf16: ~40 s (unmeasured here).
bench_online() {
    $PYTEST -s bench/test_online.py -k cuda
}
# doctor's own quick timing table, if time is left: ~45 s.
doctor_bench() {
    python3 -m scoremerge doctor --bench --json "$STAGE/doctor_bench.json"
}
export -f environment install_package doctor gpu_tests bench_projection bench_svd bench_merge \
    bench_mix bench_stream bench_online doctor_bench
export OUT STAGE PYTEST

part environment 30 5 "$OUT/env.txt" environment
part install 150 35 "$OUT/env.txt" install_package
part doctor 100 40 "$OUT/doctor.txt" doctor
part tests 150 100 "$OUT/tests.txt" gpu_tests
part projection 75 45 "$OUT/bench.txt" bench_projection
stage triton_projection_gpu projection_llm_7b
part svd_polar 90 75 "$OUT/bench.txt" bench_svd; stage svd_gpu svd_polar_vit_b16
part score_merge 75 50 "$OUT/bench.txt" bench_merge; stage svd_gpu score_merge_vit_b16
part mix 45 30 "$OUT/bench.txt" bench_mix; stage mix_gpu mix
part stream 90 60 "$OUT/bench.txt" bench_stream; stage streaming_gpu streaming_7b
part online 60 40 "$OUT/bench.txt" bench_online; stage online_cuda online
part doctor_bench 60 45 "$OUT/bench.txt" doctor_bench

tar czf "$OUT/results.tgz" -C "$STAGE" . 2>/dev/null
python3 - "$OUT" "$STAGE" "$SECONDS" "$BUDGET" <<'EOF' | tee "$OUT/summary.txt"
"""The one-screen summary: each part's time, doctor's verdict, the tests' tally and failures,
then the headline figures from the benchmarks' JSON."""
import json, re, sys
from pathlib import Path

out, stage = Path(sys.argv[1]), Path(sys.argv[2])
nan = float("nan")


def read(path):
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def rows(name):
    try:
        return json.loads((stage / f"{name}.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return []


print(f"==== gpu_run summary: {sys.argv[3]} s of a {sys.argv[4]} s budget ====")
print(read(stage / "status.txt").rstrip())
doctor = read(out / "doctor.txt").splitlines()
at = next((i for i, line in enumerate(doctor) if line.startswith("verdict")), None)
print("doctor " + ("\n  ".join(doctor[at:at + 8]) if at is not None else "gave no verdict"))
tests = read(out / "tests.txt")
tally = re.findall(r"^=* ?(\d+ (?:passed|failed|errors?|skipped)\b.*? in [\d.]+s)", tests, re.M)
print("tests:", tally[-1] if tally else "no tally (tests.txt)")
failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", tests, re.M)
print("".join(f"  FAILED {name}\n" for name in failed[:6]), end="")
for r in rows("projection_llm_7b")[1:]:
    print(f"{r['op']:17s}{r['shape']:15s}{r['precision']:7s}{r['ratio']:5.2f}x torch, "
          f"{r['of_matmul_rate']:4.0%} of fp32 matmul; err {r['err_triton']:.1e} (torch "
          f"{r['err_torch']:.1e})")
for r in rows("svd_polar_vit_b16"):
    if r.get("contender") == "cuda" and (r.get("op") == "polar" or r.get("T") == 4):
        print(f"{r['op']:14s}{r.get('shape', '')}: cuda {r.get('seconds', nan):.4f} s, "
              f"{r.get('x_vs_svd', nan):.1f}x torch.linalg.svd")
for r in rows("score_merge_vit_b16"):
    if r.get("op") == "score_merge":
        print(f"SCORE ViT-B/16, T=5: {r.get('seconds', nan):.2f} s, "
              f"{r.get('x_vs_reference', nan):.1f}x the per-key reference (goal 30x)")
for r in rows("mix"):
    if "N" in r and "cuda" in r:
        print(f"mix {r['dtype']:8s}K={r['K']:<3d}N={r['N'] / 1e6:.0f}M: cuda at "
              f"{r['cuda']['of_copy']:.0%} of copy (graph {r['cuda']['graph_of_copy'] or nan:.0%})")
for r in rows("streaming_7b"):
    print(f"stream, 2 layers of a 7B: {r['merge_s']:.1f} s (reading alone {r['read_only_s']:.1f} "
          f"s), overlap {r['overlap']:.2f}")
print(f"in {out}/: summary.txt env.txt doctor.txt doctor.json tests.txt bench.txt results.tgz")
EOF
rm -rf "$STAGE"
