"""Batched torch backend against the per-key reference on CPU, same process, same inputs.

    make bench        (or: python -m pytest bench -s)

Reports time per merge, the ratio, and each path's error against the float64 answer. The
goal: on one ViT-B block with 3 tasks in fp32, the torch backend at least 2x the reference, with
error no larger than max(2x the reference's own, 1e-3).
"""
import pytest

import scoremerge
from scoremerge import ref

from harness import interleaved
from workloads import SMALL_BLOCK, VIT_B_BLOCK, task_vectors

CASES = [("vit_b_block", VIT_B_BLOCK, "score"), ("vit_b_block", VIT_B_BLOCK, "tsv"),
         ("vit_b_block", VIT_B_BLOCK, "iso_cts"), ("vit_b_block", VIT_B_BLOCK, "iso_c"),
         ("small_block", SMALL_BLOCK, "score")]
ROWS = []


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
