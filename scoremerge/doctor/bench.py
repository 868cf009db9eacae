"""`scoremerge doctor --bench`: the headline comparisons, each fast path (backend="auto") against
the plain-torch reference (scoremerge.ref) on the same inputs in the same process, beside the
device's copy bandwidth and matmul rate measured in the same run. About a minute on a GPU, a
few seconds on a CPU (smaller shapes: the figures that count there are the ratios).

Timing follows bench/harness.py (docs/architecture.md, "Measuring"): a warm-up call (Triton compiles and
autotunes in it), then minima over rounds that alternate fast path and reference, with device
syncs. bench/ holds the full benchmarks; this is the quick look a user can run.
"""
import time

import torch

from .. import ops, ref
from ..api import merge_task_vectors
from ..backend import resolve

# (B, T, m, n) of SCORE's projection and reconstruction: one 7B layer group's 4096 x 4096 keys
# with T = 4 on a GPU; a shape that keeps the CPU's per-key reference near a second.
PROJECTION = {"cuda": (4, 4, 4096, 4096), "cpu": (4, 3, 320, 288)}
# Truncated SVDs and polar factors of ViT-B/16's 768 x 768 keys with T = 5 (12 blocks).
LINALG = {"cuda": (12, 768, 768, 5), "cpu": (6, 192, 160, 5)}
MIX = {"cuda": (4, 100_000_000), "cpu": (4, 4_000_000)}                   # K, N
MERGE = {"cuda": (768, 2, 5), "cpu": (192, 1, 3)}                        # width, blocks, T
SLOW_S = 1.0          # a warm call longer than this is timed once more, not three times


def run_bench(device):
    """{"device", "ceilings", "rows"}: one row per headline comparison, or its error."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    before = ceilings(device)
    rows = []
    for bench in (_projection, _reconstruction, _truncated_svd, _polar, _mix, _score_merge):
        try:
            rows.append(bench(device, kind))
        except Exception as e:               # one failing case must not hide the others
            rows.append({"case": bench.__name__.strip("_"),
                         "error": f"{type(e).__name__}: {str(e)[:200]}"})
        _free(device)
    # The ceilings are what the device showed at its best in this run: measured before and
    # after the cases, so a burst of load from elsewhere (a shared CPU) does not lower them.
    after = ceilings(device)
    peak = {name: max(before[name], after[name]) for name in before}
    return {"device": str(device), "ceilings": peak, "rows": [_rated(r, peak) for r in rows]}


def _rated(row, ceil):
    """The row with its rate as a fraction of the matching ceiling."""
    if "TFLOPs" in row:
        row["of_matmul"] = row["TFLOPs"] / ceil["matmul_float32_TFLOPs"]
    if "GBps" in row:
        row["of_copy"] = row["GBps"] / ceil["copy_GBps"]
    return row


def ceilings(device):
    """Copy bandwidth (GB/s) from a large device-to-device copy, and matmul rates (TFLOP/s)."""
    n = 1 << 28 if device.type == "cuda" else 1 << 24
    x = torch.empty(n, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    out = {"copy_GBps": 2 * n * 4 / best_of(lambda: y.copy_(x), device, rounds=5) / 1e9}
    size = 8192 if device.type == "cuda" else 1024
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        a = torch.randn(size, size, device=device).to(dtype)
        seconds = best_of(lambda: a @ a, device, rounds=5)
        out[f"matmul_{str(dtype).split('.')[-1]}_TFLOPs"] = 2 * size**3 / seconds / 1e12
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def best_of(fn, device, rounds=3):
    fn()
    return min(timed(fn, device) for _ in range(rounds))


def compare(fast, reference, device):
    """(fast seconds, reference seconds): warm calls, then minima over alternating rounds
    (three, or one where a warm call of either is slower than SLOW_S)."""
    warm = max(timed(fast, device), timed(reference, device))
    rounds = 1 if warm > SLOW_S else 3
    times = [[timed(fn, device) for fn in (fast, reference)] for _ in range(rounds)]
    return min(t[0] for t in times), min(t[1] for t in times)


def _row(case, op, device, fast_s, ref_s, **rate):
    return {"case": case, "fast": f"auto: {resolve(op, 'auto', device)}", "fast_s": fast_s,
            "ref_s": ref_s, "ratio": ref_s / fast_s, **rate}


def _flops_rate(flops, seconds):
    return {"TFLOPs": flops / seconds / 1e12}


def _orthonormal(B, rows, cols, device):
    """Row-major, as the polar factors a merge passes on are (QR's Q comes column-major)."""
    q, _ = torch.linalg.qr(torch.randn(B, max(rows, cols), min(rows, cols), device=device))
    return (q if rows >= cols else q.mT).contiguous()


def _projection(device, kind):
    B, T, m, n = PROJECTION[kind]
    p = T * (min(m, n) // T)
    tau = 1e-3 * torch.randn(B, T, m, n, device=device)
    U, V = _orthonormal(B, m, p, device), _orthonormal(B, p, n, device)
    fast_s, ref_s = compare(
        lambda: ops.project_and_mask(tau, U, V),
        lambda: [ref.project_and_mask(tau[b], U[b], V[b]) for b in range(B)], device)
    flops = B * T * (2 * p * m * n + 2 * p * p * min(m, n))
    return _row(f"projection {B}x{T}x{m}x{n}", "project_and_mask", device, fast_s, ref_s,
                **_flops_rate(flops, fast_s))


def _reconstruction(device, kind):
    B, _, m, n = PROJECTION[kind]
    p = min(m, n)
    U, V = _orthonormal(B, m, p, device), _orthonormal(B, p, n, device)
    S = torch.randn(B, p, p, device=device)
    base = torch.randn(B, m, n, device=device).to(torch.bfloat16)
    fast_s, ref_s = compare(
        lambda: ops.reconstruct(U, S, V, base=base, alpha=0.5, out_dtype=torch.bfloat16),
        lambda: [ref.reconstruct(U[b], S[b], V[b], base=base[b], alpha=0.5,
                                 out_dtype=torch.bfloat16) for b in range(B)], device)
    return _row(f"reconstruction {B}x{m}x{n} bf16", "reconstruct", device, fast_s, ref_s,
                **_flops_rate(2 * B * (m * p * p + m * p * n), fast_s))


def _truncated_svd(device, kind):
    B, m, n, T = LINALG[kind]
    A = torch.randn(B, m, n, device=device)
    k = min(m, n) // T
    fast_s, ref_s = compare(lambda: ops.truncated_svd(A, k), lambda: ref.truncated_svd(A, k),
                            device)
    return _row(f"truncated SVD {B}x{m}x{n} k={k}", "truncated_svd", device, fast_s, ref_s)


def _polar(device, kind):
    B, m, n, T = LINALG[kind]
    A = torch.randn(B, m, T * (min(m, n) // T), device=device)
    fast_s, ref_s = compare(lambda: ops.polar(A), lambda: ref.polar(A), device)
    return _row(f"polar {B}x{m}x{A.shape[-1]}", "polar", device, fast_s, ref_s)


def _mix(device, kind):
    K, N = MIX[kind]
    experts = torch.randn(K, N, device=device)
    coeffs = torch.softmax(torch.randn(2, K, device=device), dim=1)
    bounds, out = [0, N - N // 100, N], torch.empty(N, device=device)
    fast_s, ref_s = compare(lambda: ops.mix(experts, coeffs, bounds, out=out),
                            lambda: ref.mixing.mix(experts, coeffs, bounds), device)
    return _row(f"mix K={K} N={N / 1e6:.0f}M fp32", "mix", device, fast_s, ref_s,
                GBps=(K + 1) * N * 4 / fast_s / 1e9)


def _score_merge(device, kind):
    """SCORE over ViT-B-shaped blocks (qkv, proj, fc1, fc2 and their biases) against the
    per-key reference (backend="reference")."""
    d, blocks, T = MERGE[kind]
    shapes = {}
    for i in range(blocks):
        shapes |= {f"blocks.{i}.qkv": (3 * d, d), f"blocks.{i}.proj": (d, d),
                   f"blocks.{i}.fc1": (4 * d, d), f"blocks.{i}.fc2": (d, 4 * d),
                   f"blocks.{i}.fc1.bias": (4 * d,)}
    tvs = [{k: 1e-3 * torch.randn(*s, device=device) for k, s in shapes.items()}
           for _ in range(T)]
    fast_s, ref_s = compare(lambda: merge_task_vectors(tvs, "score"),
                            lambda: merge_task_vectors(tvs, "score", backend="reference"), device)
    label = f"{blocks} ViT-B blocks" if kind == "cuda" else f"a {d}-wide block"
    return {**_row(f"SCORE, {label}, T={T}", "truncated_svd", device, fast_s, ref_s),
            "fast": "auto"}


def _free(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
