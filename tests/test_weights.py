"""Per-expert weights (and per-expert densities): every method against the reference with the
weights, the weighted forms checked by hand, linear over the models, streaming equal to the
in-memory merge, and the refusals."""
import pytest
import torch

import scoremerge
from scoremerge import MergeInputError, ref
from scoremerge.io import load_state_dict, save_state_dict
from scoremerge.streaming import merge_checkpoints

from conftest import MIXED_SHAPES, random_task_vectors, rel_err

WEIGHTS = (0.7, -0.4, 1.9)
TASK_METHODS = [n for n, s in scoremerge.methods().items() if not s.on_models]
OPTIONS = {"ties": [{}, {"scope": "tensor", "density": (0.5, 0.3, 0.9)},
                    {"disjoint": "sum", "trim": "exact", "zero_sign": "plus"},
                    {"scope": "tensor", "trim": "exact", "density": (0.25, 1.0, 0.6)}]}
CASES = [(m, o) for m in TASK_METHODS for o in OPTIONS.get(m, [{}])]


def models(T=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g, dtype=dtype) for k, s in MIXED_SHAPES.items()}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=dtype)
                for k, v in base.items()} for _ in range(T)]
    return base, experts


@pytest.mark.parametrize("method,options", CASES)
def test_weighted_merge_equals_the_reference(method, options):
    tvs = random_task_vectors(MIXED_SHAPES, T=3, seed=4)
    fast = scoremerge.merge_task_vectors(tvs, method, weights=WEIGHTS, exclude=("head",),
                                         **options)
    want = ref.merge_task_vectors(tvs, method, weights=WEIGHTS, exclude=("head",), **options)
    for key in want:
        assert rel_err(fast[key], want[key]) < 1e-9, key


@pytest.mark.parametrize("method", ["score", "tsv", "iso_c", "iso_cts", "task_arithmetic",
                                    "magmax"])
def test_other_methods_merge_the_scaled_task_vectors(method):
    tvs = random_task_vectors(MIXED_SHAPES, T=3, seed=5)
    scaled = [{k: w * v for k, v in tv.items()} for w, tv in zip(WEIGHTS, tvs)]
    got = scoremerge.merge_task_vectors(tvs, method, weights=WEIGHTS)
    want = scoremerge.merge_task_vectors(scaled, method)
    for key in want:
        assert rel_err(got[key], want[key]) < 1e-12, key


def test_weighted_mean_and_task_arithmetic_by_hand():
    tvs = random_task_vectors({"w": (5, 7)}, T=3, seed=6)
    total = sum(w * tv["w"] for w, tv in zip(WEIGHTS, tvs))
    got = scoremerge.merge_task_vectors(tvs, "mean", weights=WEIGHTS)["w"]
    assert torch.allclose(got, total / sum(WEIGHTS), rtol=1e-13, atol=0)
    got = scoremerge.merge_task_vectors(tvs, "task_arithmetic", weights=WEIGHTS)["w"]
    assert torch.allclose(got, total, rtol=1e-13, atol=0)


def test_ties_weights_by_hand():
    """Two tasks, density 1: the elected sign is that of the weighted sum, and the merged value
    the weighted mean of the agreeing ones."""
    a = {"w": torch.tensor([1.0, 2.0, -3.0, 4.0], dtype=torch.float64)}
    b = {"w": torch.tensor([-1.5, 1.0, -1.0, 0.0], dtype=torch.float64)}
    got = scoremerge.merge_task_vectors([a, b], "ties", weights=(2.0, 1.0), density=1.0)["w"]
    # entry 0: 2*1 + 1*-1.5 = 0.5 > 0, only a agrees: 2/2 = 1; entry 1: (4 + 1) / 3;
    # entry 2: (-6 - 1) / 3; entry 3: b is zero: 8 / 2
    want = torch.tensor([1.0, 5 / 3, -7 / 3, 4.0], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-15, atol=0)
    ones = scoremerge.merge_task_vectors([a, b], "ties", weights=(1, 1), density=0.5)["w"]
    assert torch.equal(ones, scoremerge.merge_task_vectors([a, b], "ties", density=0.5)["w"])


def test_per_expert_density_trims_each_task_by_its_own():
    a = {"w": torch.arange(1.0, 11.0, dtype=torch.float64)}
    b = {"w": -torch.arange(1.0, 11.0, dtype=torch.float64) / 100}
    got = scoremerge.merge_task_vectors([a, b], "ties", density=(0.2, 1.0), disjoint="sum",
                                        scope="tensor")["w"]
    # a keeps 9 and 10; b keeps all ten, but loses the election where a is kept
    want = -torch.arange(1.0, 11.0, dtype=torch.float64) / 100
    want[8:] = torch.tensor([9.0, 10.0], dtype=torch.float64)
    assert torch.equal(got, want)


def test_exact_trim_keeps_exactly_int_density_n_entries():
    x = {"w": torch.tensor([3.0, 1.0, 1.0, 1.0, 2.0], dtype=torch.float64)}
    got = scoremerge.merge_task_vectors([x], "ties", density=0.5, trim="exact")["w"]
    assert int((got != 0).sum()) == 2 and got[0] == 3 and got[4] == 2      # int(2.5) = 2
    tied = scoremerge.merge_task_vectors([x], "ties", density=0.6)["w"]    # round(3.0): 3 + ties
    assert int((tied != 0).sum()) == 5


def test_linear_averages_the_models():
    base, experts = models()
    got = scoremerge.merge(base, experts, "linear", weights=WEIGHTS)
    want = scoremerge.merge(base, experts, "linear", weights=WEIGHTS, backend="reference")
    for key, b in base.items():
        by_hand = sum(w * e[key] for w, e in zip(WEIGHTS, experts)) / sum(WEIGHTS)
        assert rel_err(got[key], by_hand) < 1e-13 and rel_err(want[key], by_hand) < 1e-13, key
    summed = scoremerge.merge(base, experts, "linear", weights=WEIGHTS, normalize=False)
    key = next(iter(base))
    assert rel_err(summed[key], sum(w * e[key] for w, e in zip(WEIGHTS, experts))) < 1e-13
    uniform = scoremerge.merge(base, experts, "linear")
    mean = scoremerge.merge(base, experts, "mean")
    assert all(rel_err(uniform[k], mean[k]) < 1e-13 for k in base)


@pytest.mark.parametrize("method, options", [("task_arithmetic", {}), ("mean", {}),
                                             ("ties", {"scope": "tensor", "density": (0.3, 0.5, 0.8)}),
                                             ("linear", {}), ("tsv", {})])
def test_streaming_equals_in_memory_with_weights(tmp_path, method, options):
    base, experts = models(dtype=torch.float32)
    paths = [tmp_path / "base"] + [tmp_path / f"e{i}" for i in range(3)]
    for path, model in zip(paths, [base, *experts]):
        save_state_dict(model, path)
    merge_checkpoints(paths[0], paths[1:], tmp_path / "out", method, weights=WEIGHTS,
                      progress=False, **options)
    streamed = load_state_dict(tmp_path / "out")
    in_memory = scoremerge.merge(base, experts, method, weights=WEIGHTS, **options)
    if scoremerge.methods()[method].kind != "matrix":
        for key, value in in_memory.items():
            assert torch.equal(streamed[key], value), key
        return
    # An SVD method's products run on however many intra-op threads the grouping of keys leaves
    # each one, and MKL's kernels round differently by thread count on some CPUs (AVX-512 EPYC):
    # the two agree within the float32 merge's own error, not to the bit.
    answer = scoremerge.merge(*models(), method, weights=WEIGHTS, **options)
    for key, value in in_memory.items():
        assert rel_err(streamed[key], value) <= 2 * rel_err(value, answer[key]), key


@pytest.mark.parametrize("weights, options, match", [
    ((1.0, 2.0), {}, r"one per expert: 3 expert\(s\), 2 weight\(s\)"),
    ((1.0, float("nan"), 1.0), {}, r"weights\[1\]: must be a finite number"),
    ((1.0, True, 1.0), {}, r"weights\[1\]: must be a finite number"),
    (3.0, {}, r"weights must be a list of numbers"),
    ((1.0, -1.0, 0.0), {"method": "mean"}, r"weights sum to 0, and mean divides"),
    (None, {"method": "ties", "density": (0.5, 0.5)}, r"density.*3 values, one per expert; got 2"),
    (None, {"method": "linear", "alpha": 0.5}, r"alpha does not apply"),
])
def test_bad_weights_are_refused(weights, options, match):
    base, experts = models()
    options = {"method": "task_arithmetic", **options}
    with pytest.raises(MergeInputError, match=match):
        scoremerge.merge(base, experts, weights=weights, **options)


def test_linear_is_not_a_task_vector_method():
    with pytest.raises(MergeInputError, match="merges the experts' weights"):
        scoremerge.merge_task_vectors(random_task_vectors(MIXED_SHAPES, 2, 0), "linear")


def test_exact_trim_with_ties_across_the_cut_follows_the_sort():
    """bf16-like data: many equal magnitudes at the cut, where the selection cannot decide and
    the argsort's own choice is taken; elsewhere the O(N) selection gives the same set."""
    g = torch.Generator().manual_seed(9)
    x = (torch.randint(-4, 5, (3, 50, 40), generator=g).float() / 4)
    tvs = [{"w": x[t]} for t in range(3)]
    got = scoremerge.merge_task_vectors(tvs, "ties", density=(0.3, 0.5, 0.75), trim="exact",
                                        scope="tensor", disjoint="sum")["w"]
    want = ref.merge_task_vectors(tvs, "ties", density=(0.3, 0.5, 0.75), trim="exact",
                                  scope="tensor", disjoint="sum")["w"]
    assert torch.equal(got, want)


def test_linear_in_chunks_equals_the_whole_key_to_the_bit():
    from scoremerge.methods import get
    g = torch.Generator().manual_seed(2)
    shapes = {"big": (300, 701), "small": (7,)}
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
    experts = [{k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}
               for _ in range(3)]
    got = scoremerge.merge(base, experts, "linear", weights=WEIGHTS)
    for key, b in base.items():
        x = torch.stack([e[key].float() for e in experts])
        want = get("linear").fn({key: x}, weights=torch.tensor(WEIGHTS))[key].to(b.dtype)
        assert torch.equal(got[key], want), key


@pytest.mark.parametrize("n", [(1 << 20) + 3, 3_000_001])
def test_kth_largest_is_kthvalue_exactly(n):
    from scoremerge.methods.ties_ranking import kth_largest
    g = torch.Generator().manual_seed(n)
    cases = [torch.randn(n, generator=g).abs(),                                  # continuous
             torch.randint(0, 7, (n,), generator=g).float(),                     # heavy ties
             torch.cat([torch.zeros(n - 10), torch.arange(10.0)])]               # skewed
    for values in cases:
        for k in (1, 2, n // 3, n // 2 + 1, n - 1, n):
            assert kth_largest(values, k) == values.kthvalue(n - k + 1).values, k


@pytest.mark.parametrize("trim", ["threshold", "exact"])
def test_ties_on_a_key_larger_than_a_chunk_and_the_sample_matches_the_reference(trim):
    g = torch.Generator().manual_seed(11)
    tvs = [{"w": torch.randn(1100, 1001, generator=g)} for _ in range(3)]
    options = dict(density=(0.3, 0.55, 0.8), scope="tensor", trim=trim, zero_sign="plus")
    got = scoremerge.merge_task_vectors(tvs, "ties", weights=WEIGHTS, **options)["w"]
    want = ref.merge_task_vectors(tvs, "ties", weights=WEIGHTS, **options)["w"]
    assert torch.equal(got, want)
