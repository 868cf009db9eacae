"""sort_prefix: which entries torch.argsort(descending=True)[:k] keeps, found by replaying the
introsort's partitions (compiled, and in torch) instead of sorting, compared with torch's own
argsort on fresh tie-heavy inputs of odd sizes: the same set, to the entry."""
import importlib
import os

import pytest
import torch

sort_prefix = importlib.import_module("scoremerge.methods.sort_prefix")


def argsort_mask(values, k):
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.argsort(values, descending=True)[:k]] = True
    return mask


def tie_heavy(n, kind, g):
    x = torch.randn(n, generator=g)
    if kind == "fp16":                         # a difference of nearby low-precision weights
        x = x.half().float()
    elif kind == "integers":
        x = (x * 3).round()
    elif kind == "two values":
        x = (torch.rand(n, generator=g) < 0.1).float()
    elif kind == "constant":
        x = torch.ones(n)
    return x.abs()


KINDS = ["fp16", "integers", "two values", "constant", "distinct"]


def test_compiled_replay_is_built_under_ci():
    if "CI" in os.environ:                     # CI builds the package with a C++ compiler
        assert sort_prefix.compiled(), "scoremerge._cpu was not built, or disagrees with argsort"


@pytest.mark.parametrize("replay", ["compiled", "torch"])
@pytest.mark.parametrize("kind", KINDS)
def test_replay_keeps_what_argsort_keeps(replay, kind):
    if replay == "compiled" and not sort_prefix.compiled():
        pytest.skip("scoremerge._cpu was not built")
    prefix = sort_prefix._compiled_prefix if replay == "compiled" else sort_prefix._replayed
    seed = int(torch.randint(0, 2**31, (1,)))          # fresh inputs each run, named on failure
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 16, 17, 33] + torch.randint(34, 20_000, (12,), generator=g).tolist() + \
        torch.randint(20_000, 300_000, (3,), generator=g).tolist()
    for n in sizes:
        values = tie_heavy(n, kind, g)
        for k in {1, n, max(1, n // 2), int(torch.randint(1, n + 1, (1,), generator=g))}:
            got = prefix(values.clone(), k)
            assert got is not None and torch.equal(got, argsort_mask(values, k)), (seed, n, k)


def test_public_entry_matches_argsort_and_keeps_its_input():
    g = torch.Generator().manual_seed(11)
    values = tie_heavy(123_457, "fp16", g)
    before = values.clone()
    assert torch.equal(sort_prefix.argsort_prefix_mask(values, 40_001), argsort_mask(before, 40_001))
    assert torch.equal(values, before)                  # scratch=False: a copy was permuted
    assert torch.equal(sort_prefix.argsort_prefix_mask(values, 40_001, scratch=True),
                       argsort_mask(before, 40_001))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_and_nan_take_a_correct_path(dtype):
    g = torch.Generator().manual_seed(5)
    values = tie_heavy(5_001, "integers", g).to(dtype)
    assert torch.equal(sort_prefix.argsort_prefix_mask(values, 2_000), argsort_mask(values, 2_000))
    values = tie_heavy(5_001, "fp16", g)
    values[[7, 4_000]] = float("nan")                  # the sort's NaN order is argsort's own
    assert torch.equal(sort_prefix.argsort_prefix_mask(values, 2_000), argsort_mask(values, 2_000))


@pytest.mark.parametrize("scratch", [False, True])
def test_past_the_depth_limit_argsort_answers_on_the_values_as_given(scratch):
    """Where the introsort would turn to heapsort (here forced by a depth limit of 1), the
    compiled replay declines with the values put back in place, and argsort answers."""
    if not sort_prefix.compiled():
        pytest.skip("scoremerge._cpu was not built")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    values = tie_heavy(50_001, "fp16", g)
    before = values.clone()
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    assert not sort_prefix._compiled_mask(values, 20_000, mask, depth=1)
    assert torch.equal(values, before) and not mask.any()
    real = sort_prefix._compiled_mask
    try:
        sort_prefix._compiled_mask = lambda v, k, m: real(v, k, m, depth=1)
        got = sort_prefix.argsort_prefix_mask(values, 20_000, scratch=scratch)
    finally:
        sort_prefix._compiled_mask = real
    assert torch.equal(got, argsort_mask(before, 20_000))


def test_the_probe_tells_a_different_order_apart():
    """The once-per-process check would refuse a replay that keeps other tied entries: a
    stable sort's prefix (a plausible wrong guess of the order) fails it."""
    def stable_prefix(values, k):
        mask = torch.zeros(values.numel(), dtype=torch.bool)
        mask[torch.argsort(values, descending=True, stable=True)[:k]] = True
        return mask
    assert not sort_prefix._agrees(stable_prefix)
    assert sort_prefix._agrees(argsort_mask)
