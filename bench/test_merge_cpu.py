"""Batched torch backend against the per-key reference on CPU, same process, same inputs.

    make bench        (or: python -m pytest bench -s)

Reports time per merge, the ratio, and each path's error against the float64 answer. Issue 3's
goal: on one ViT-B block with 3 tasks in fp32, the torch backend at least 2x the reference, with
error no larger than max(2x the reference's own, 1e-3).
"""
import pytest
import torch

import scoremerge
from scoremerge import ref

from harness import interleaved

VIT_B_BLOCK = {"attn.in_proj_weight": (2304, 768), "attn.in_proj_bias": (2304,),
               "attn.out_proj.weight": (768, 768), "attn.out_proj.bias": (768,),
               "ln_1.weight": (768,), "ln_1.bias": (768,), "ln_2.weight": (768,),
               "ln_2.bias": (768,), "mlp.c_fc.weight": (3072, 768), "mlp.c_fc.bias": (3072,),
               "mlp.c_proj.weight": (768, 3072), "mlp.c_proj.bias": (768,)}
SMALL_BLOCK = {k: tuple(d // 4 for d in s) for k, s in VIT_B_BLOCK.items()}
CASES = [("vit_b_block", VIT_B_BLOCK, "score"), ("vit_b_block", VIT_B_BLOCK, "tsv"),
         ("vit_b_block", VIT_B_BLOCK, "iso_cts"), ("vit_b_block", VIT_B_BLOCK, "iso_c"),
         ("small_block", SMALL_BLOCK, "score")]
ROWS = []


def task_vectors(shapes, T=3, seed=0):
    """Low-rank-plus-noise task vectors, as fine-tuning updates look (decaying spectra)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        tv = {}
        for key, shape in shapes.items():
            if len(shape) == 2:
                r = min(shape) // 8
                tv[key] = (torch.randn(shape[0], r, generator=g, dtype=torch.float64)
                           @ torch.randn(r, shape[1], generator=g, dtype=torch.float64) / r
                           + 0.1 * torch.randn(*shape, generator=g, dtype=torch.float64)) * 1e-3
            else:
                tv[key] = 1e-3 * torch.randn(*shape, generator=g, dtype=torch.float64)
        out.append(tv)
    return out


def worst_error(got, answer):
    return max(((got[k].double() - answer[k]).norm() / answer[k].norm()).item() for k in answer)


@pytest.mark.parametrize("case,shapes,method", CASES, ids=[f"{c}-{m}" for c, _, m in CASES])
def test_torch_backend_vs_reference(benchmark, case, shapes, method):
    tv64 = task_vectors(shapes)
    tv32 = [{k: v.float() for k, v in tv.items()} for tv in tv64]
    answer = ref.merge_task_vectors(tv64, method)
    fast_s, ref_s = interleaved(lambda: scoremerge.merge_task_vectors(tv32, method, backend="torch"),
                                lambda: ref.merge_task_vectors(tv32, method), rounds=3)
    fast_out = benchmark.pedantic(lambda: scoremerge.merge_task_vectors(tv32, method, backend="torch"),
                                  rounds=1, iterations=1)
    err_fast = worst_error(fast_out, answer)
    err_ref = worst_error(ref.merge_task_vectors(tv32, method), answer)
    row = {"case": case, "method": method, "T": 3, "dtype": "float32", "torch_s": fast_s,
           "reference_s": ref_s, "ratio": ref_s / fast_s, "err_torch": err_fast, "err_reference": err_ref}
    benchmark.extra_info.update(row)
    ROWS.append(row)
    print(f"\n{case:12s} {method:8s} torch {fast_s:7.3f} s  reference {ref_s:7.3f} s  "
          f"ratio {ref_s / fast_s:5.2f}x  err torch {err_fast:.1e}  reference {err_ref:.1e}")
    assert err_fast <= max(2 * err_ref, 1e-3)
