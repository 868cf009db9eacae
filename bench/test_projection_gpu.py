"""Triton projection+mask and reconstruction against the plain-torch sequence on a GPU, same
process, same inputs. Skipped without CUDA.

    python -m pytest bench/test_projection_gpu.py -s

Cases: a ViT-B/16 (12 layers of 2304x768, 768x768, 3072x768, 768x3072) with T = 3 and 5, and a
7B-LLM layer group (4 x 4096x4096, 2 x 11008x4096, 1 x 4096x11008) with T = 4. Reports time,
ratio, achieved TFLOP/s and its fraction of the torch.matmul rate measured in the same run at the
same precision (fp32: "tf32x3" is three tf32 tensor-core products standing in for one fp32
product, so its rate is also shown against the tf32 matmul rate, where it is capped near 1/3),
and each path's error against float64. Goals on an H200: projection+mask >= 3x the torch sequence and
>= 60% of the matmul rate on the LLM group; reconstruction >= 1.5x matmul+scale+add+cast.

Selection (bench/gpu_run.sh cuts the run to its time box; the measurements are unchanged):
SCOREMERGE_BENCH_CASES=llm_7b (or vit_b16; default both), SCOREMERGE_BENCH_PRECISIONS=tf32x3
(default ieee,tf32x3).
"""
import os

import pytest
import torch

from scoremerge import ops
from scoremerge.ops.projection import batched as torch_projection

from harness import best_time, ceilings, interleaved, record, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VIT_B = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
LLM_7B = {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1}
SELECTED = os.environ.get("SCOREMERGE_BENCH_CASES", "vit_b16,llm_7b").split(",")
PRECISIONS = os.environ.get("SCOREMERGE_BENCH_PRECISIONS", "ieee,tf32x3").split(",")
CASES = [case for case in ([("vit_b16", m, n, 12, T) for T in (3, 5) for m, n in VIT_B]
                           + [("llm_7b", m, n, B, 4) for (m, n), B in LLM_7B.items()])
         if case[0] in SELECTED]
ROWS = []


def orthonormal(B, rows, cols, device):
    q, _ = torch.linalg.qr(torch.randn(B, max(rows, cols), min(rows, cols), device=device))
    return q if rows >= cols else q.mT.contiguous()


def projection_flops(B, T, m, n, p):
    first = 2 * p * m * n
    second = 2 * p * n * p if n <= m else 2 * p * m * p
    return B * T * (first + second)


@pytest.fixture(scope="module")
def rates():
    out = ceilings("cuda")
    size = 8192
    a = torch.randn(size, size, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        s = best_time(lambda: a @ a, rounds=5, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
    out["matmul_tf32_TFLOPs"] = 2 * size**3 / s / 1e12
    yield out
    record("triton_projection_gpu", [{"ceilings": out}] + ROWS, "cuda")
    print()
    for row in ROWS:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})


@pytest.mark.parametrize("case, m, n, B, T", CASES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_project_and_mask_speed(rates, case, m, n, B, T, precision):
    p = T * (min(m, n) // T)
    tau = 1e-3 * torch.randn(B, T, m, n, device="cuda")
    U, V = orthonormal(B, m, p, "cuda"), orthonormal(B, p, n, "cuda")

    def fast():
        return ops.project_and_mask(tau, U, V, precision=precision, backend="triton")

    def torch_sequence():
        return torch_projection.project_and_mask(tau, U, V, "full", 1.96, True)

    t_fast, t_torch = interleaved(fast, torch_sequence, rounds=3, device="cuda")
    answer = torch_projection.project_and_mask(tau.double(), U.double(), V.double(), "full",
                                               1.96, True)
    tflops = projection_flops(B, T, m, n, p) / t_fast / 1e12
    ROWS.append({"op": "project_and_mask", "case": case, "shape": f"{B}x{T}x{m}x{n}", "p": p,
                 "precision": precision, "triton_s": t_fast, "torch_s": t_torch,
                 "ratio": t_torch / t_fast, "TFLOPs": tflops,
                 "of_matmul_rate": tflops / rates["matmul_float32_TFLOPs"],
                 "of_tf32_rate": tflops / rates["matmul_tf32_TFLOPs"],
                 "err_triton": rel_err(fast(), answer),
                 "err_torch": rel_err(torch_sequence(), answer)})


@pytest.mark.parametrize("case, m, n, B, T", [c for c in CASES if c[4] != 5])
def test_reconstruct_speed(rates, case, m, n, B, T):
    p = T * (min(m, n) // T)
    U, V = orthonormal(B, m, p, "cuda"), orthonormal(B, p, n, "cuda")
    S = torch.randn(B, p, p, device="cuda")
    base = torch.randn(B, m, n, device="cuda").to(torch.bfloat16)

    def fast():                             # default precision: tf32x3 on the GPU
        return ops.reconstruct(U, S, V, base=base, alpha=0.5, out_dtype=torch.bfloat16,
                               backend="triton")

    def torch_sequence():                   # matmul + scale + add + cast, as torch runs it
        return (base.float() + 0.5 * ((U @ S) @ V)).to(torch.bfloat16)

    t_fast, t_torch = interleaved(fast, torch_sequence, rounds=3, device="cuda")
    answer = base.double() + 0.5 * ((U.double() @ S.double()) @ V.double())
    tflops = 2 * B * (m * p * p + m * p * n) / t_fast / 1e12
    ROWS.append({"op": "reconstruct", "case": case, "shape": f"{B}x{m}x{n}", "p": p,
                 "precision": "tf32x3", "triton_s": t_fast, "torch_s": t_torch,
                 "ratio": t_torch / t_fast, "TFLOPs": tflops,
                 "of_matmul_rate": tflops / rates["matmul_float32_TFLOPs"],
                 "err_triton": rel_err(fast(), answer),
                 "err_torch": rel_err(torch_sequence(), answer)})
