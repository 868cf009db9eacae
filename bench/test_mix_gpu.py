"""ops.mix on a GPU: the CUDA kernel, the Triton kernel and the torch backend over one flat arena,
same process, same inputs; then the arena against per-parameter torch loops over a
ViT-B/16-shaped state dict with K = 5. Skipped without CUDA.

    python -m pytest bench/test_mix_gpu.py -s

Arena cases: N in {10M, 100M, 1B} parameters, K in {2, 4, 8, 16} experts, fp32 and bf16, two
groups (a classifier head's 769k parameters at the end). Mixing moves (K + 1) * N elements and
nothing else, so each backend's bandwidth (K + 1) * N * bytes / time is reported against the
device-to-device copy bandwidth measured in the same run, with its speed-up over the torch backend.
Cases needing more than ~100 GB (or 85% of the device) are skipped. Two figures per backend:
ops.mix called eagerly, back to back (at N = 10M a call lasts tens of microseconds, so its
host-side checks and dispatch can show), and the same calls replayed from a CUDA graph (the
kernel's own rate, what a captured online-merging step sees).
Goal on an H200: the CUDA kernel at >= 90% of the copy bandwidth for N from 10M to 1B.

Selection (bench/gpu_run.sh cuts the run to its time box; the measurements are unchanged):
SCOREMERGE_BENCH_MIX_N=10000000,1000000000 and SCOREMERGE_BENCH_MIX_K=4,16 (default: every N
and K above).
"""
import importlib.metadata
import math
import os

import pytest
import torch

from scoremerge import backend, ops
from scoremerge.backend import cuda as cuda_backend

from harness import ceilings, interleaved, record
from workloads import per_parameter_loops, vit_b16_arena

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = ("cuda", "triton", "torch")
SIZES = [int(n) for n in os.environ.get("SCOREMERGE_BENCH_MIX_N",
                                          "10000000,100000000,1000000000").split(",")]
EXPERTS = [int(k) for k in os.environ.get("SCOREMERGE_BENCH_MIX_K", "2,4,8,16").split(",")]
CASES = [(N, K, dtype) for N in SIZES for K in EXPERTS for dtype in (torch.float32, torch.bfloat16)]
HEAD = 769_000
ROWS = []


def _versions():
    out = {}
    for name in ("cupy-cuda13x", "cupy-cuda12x"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    ext = cuda_backend.extension()[0]
    if ext is not None:
        out["scoremerge._C cuda_runtime"] = ext.cuda_runtime_version()
    return out


@pytest.fixture(scope="module")
def copy_rate():
    device = torch.device("cuda")
    rates = ceilings(device)
    ready = {name: backend.unavailable_reason(name, device) for name in BACKENDS}
    yield rates["copy_GBps"]
    header = {"ceilings": rates, "unavailable": {k: v for k, v in ready.items() if v},
              "cuda_path": cuda_backend.route(torch.cuda.current_device())[0], **_versions()}
    record("mix_gpu", [header] + ROWS, "cuda")


def _runnable():
    return [b for b in BACKENDS if backend.unavailable_reason(b, torch.device("cuda")) is None]


def _graphed(fn, reps):
    """fn called reps times, captured once into a CUDA graph; returns its replay (None when the
    backend cannot be captured, which the row then says)."""
    fn()                                   # compile, build and cache the block table first
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
    except RuntimeError:
        return None
    return graph.replay


def _repeated(fn, bytes_moved):
    """fn run often enough that one timing moves ~20 GB: a 10M case takes tens of microseconds,
    too short for a host timer around one call. Returns (the repeated fn, its repeat count)."""
    reps = max(1, math.ceil(20e9 / bytes_moved))

    def run():
        for _ in range(reps):
            fn()
    return run, reps


@pytest.mark.parametrize("N, K, dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_arena_mix_bandwidth(copy_rate, N, K, dtype):
    elt = torch.empty(0, dtype=dtype).element_size()
    need = (K + 1) * N * elt
    if need > min(100e9, 0.85 * torch.cuda.get_device_properties(0).total_memory):
        pytest.skip(f"needs {need / 1e9:.0f} GB")
    experts = torch.randn(K, N, device="cuda", dtype=dtype)
    coeffs = torch.softmax(torch.randn(2, K, device="cuda"), dim=1)
    bounds = [0, N - HEAD, N]
    out = torch.empty(N, device="cuda", dtype=dtype)
    names = _runnable()
    fns = [_repeated(lambda b=b: ops.mix(experts, coeffs, bounds, out=out, backend=b), need)
           for b in names]
    times = interleaved(*(fn for fn, _ in fns), rounds=3, device="cuda")
    seconds = {b: t / reps for b, t, (_, reps) in zip(names, times, fns)}
    graph_seconds = {}
    for b, (_, reps) in zip(names, fns):
        replay = _graphed(lambda b=b: ops.mix(experts, coeffs, bounds, out=out, backend=b), reps)
        graph_seconds[b] = None if replay is None else \
            interleaved(replay, rounds=3, device="cuda")[0] / reps
    sample = slice(None, None, 1009)
    results = {}
    for b in names:
        ops.mix(experts, coeffs, bounds, out=out, backend=b)
        results[b] = out[sample].double()
    row = {"N": N, "K": K, "dtype": str(dtype).replace("torch.", ""), "GB_moved": need / 1e9}
    for b in names:
        GBps = need / seconds[b] / 1e9
        gs = graph_seconds[b]
        row[b] = {"s": seconds[b], "GBps": GBps, "of_copy": GBps / copy_rate,
                  "graph_s": gs,
                  "graph_of_copy": None if gs is None else need / gs / 1e9 / copy_rate,
                  "vs_torch": seconds["torch"] / seconds[b],
                  "max_diff_vs_torch": (results[b] - results["torch"]).abs().max().item()}
    ROWS.append(row)
    print(f"\n{row['dtype']} K={K} N={N / 1e6:.0f}M: " + " | ".join(
        f"{b} {row[b]['GBps']:.0f} GB/s ({row[b]['of_copy']:.2f} of copy; graph "
        f"{row[b]['graph_of_copy'] or float('nan'):.2f}; {row[b]['vs_torch']:.1f}x torch)"
        for b in names))
    del experts, out
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_vit_b16_arena_against_per_parameter_loops(copy_rate, dtype):
    K = 5
    arena, bounds, experts = vit_b16_arena(K, device="cuda", dtype=dtype)
    N = arena.shape[1]
    coeffs = torch.softmax(torch.randn(2, K, device="cuda"), dim=1)
    # the loops take Python floats: no device syncs inside them
    loop_in_place, loop_sum, _ = per_parameter_loops(experts, coeffs.tolist())
    out = torch.empty(N, device="cuda", dtype=dtype)
    names = _runnable()
    arena_fns = [lambda b=b: ops.mix(arena, coeffs, bounds, out=out, backend=b) for b in names]
    times = interleaved(*arena_fns, loop_in_place, loop_sum, rounds=5, device="cuda")
    arena_s, t_loop, t_sum = dict(zip(names, times)), times[-2], times[-1]
    moved = (K + 1) * N * arena.element_size()
    row = {"case": "vit_b16", "params": N, "K": K, "dtype": str(dtype).replace("torch.", ""),
           "loop_in_place_s": t_loop, "loop_sum_s": t_sum}
    for b in names:
        row[b] = {"s": arena_s[b], "GBps": moved / arena_s[b] / 1e9,
                  "of_copy": moved / arena_s[b] / 1e9 / copy_rate,
                  "vs_loop_in_place": t_loop / arena_s[b], "vs_loop_sum": t_sum / arena_s[b]}
    ROWS.append(row)
    print(f"\nvit_b16 {row['dtype']} K={K}: loops {t_loop * 1e3:.2f} / {t_sum * 1e3:.2f} ms | "
          + " | ".join(f"{b} {arena_s[b] * 1e3:.3f} ms ({row[b]['vs_loop_in_place']:.1f}x the "
                       f"in-place loop)" for b in names))
