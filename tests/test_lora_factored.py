"""Factored LoRA ops and methods against their dense references (scoremerge.lora.reference,
scoremerge.ref, scoremerge.api.merge_task_vectors): float64 to 1e-10, float32 within twice the
dense reference's own float32 error against the float64 answer."""
import pytest
import torch

import scoremerge
from scoremerge import MergeInputError, ref
from scoremerge.lora import LowRank, factored, merge_adapters, merge_factored, reference

from conftest import rel_err

METHODS = ["score", "tsv", "iso_c", "iso_cts", "task_arithmetic", "mean"]
OPTIONS = {"score": [{}, {"variant": "diag"}, {"variant": "offdiag"}, {"variant": "untrimmed"},
                     {"trim_per_task": False, "trim_multiplier": 1.0}],
           "iso_cts": [{}, {"common_space_fraction": 0.5}]}
CASES = [(m, o) for m in METHODS for o in OPTIONS.get(m, [{}])]


def random_update(shape, r, g, dtype=torch.float64, batch=()):
    scaling = float(torch.rand((), generator=g, dtype=torch.float64)) + 0.5
    return LowRank(torch.randn(*batch, shape[0], r, generator=g, dtype=torch.float64).to(dtype),
                   torch.randn(*batch, r, shape[1], generator=g, dtype=torch.float64).to(dtype),
                   scaling)


def random_experts(shapes, ranks, seed, missing=()):
    """Factored task vectors, expert t of rank ranks[t] on every key but (t, key) in missing."""
    g = torch.Generator().manual_seed(seed)
    return [{key: random_update(shape, r, g) for key, shape in shapes.items()
             if (t, key) not in missing} for t, r in enumerate(ranks)]


def in_float32(tvs):
    return [{k: LowRank(u.B.float(), u.A.float(), u.scaling) for k, u in tv.items()} for tv in tvs]


def dense(x):
    return x.materialize() if isinstance(x, LowRank) else x


# Every rank >= k = min(m, n) // T and every sum of full rank: the low-rank convention is the
# dense definition, and api.merge_task_vectors is the answer.
FULL_SHAPES = {"tall": (37, 23), "wide": (23, 41), "thin": (2, 19)}
FULL_RANKS = (9, 11, 8)
# Ranks far below k (LoRA's case), one key missing from one expert, one excluded key.
LOW_SHAPES = {"q": (97, 61), "down": (61, 120), "lm": (45, 45)}
LOW_RANKS = (3, 5, 4)
LOW_MISSING = {(1, "down")}


# ---- ops ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,r,batch", [((53, 31), 7, ()), ((31, 77), 5, (2, 3)),
                                           ((6, 40), 9, (2,)), ((45, 45), 1, ())])
def test_svd_matches_dense_svd(shape, r, batch):
    g = torch.Generator().manual_seed(sum(shape) + r)
    update = random_update(shape, r, g, batch=batch)
    k = min(r, *shape)
    U, S, Vh = factored.svd(update)
    Ur, Sr, Vhr = reference.svd(update, k)
    assert U.shape == (*batch, shape[0], k) and Vh.shape == (*batch, k, shape[1])
    for x, y in ((U, Ur), (S, Sr), (Vh, Vhr)):
        assert rel_err(x, y) < 1e-10
    low = LowRank(update.B.float(), update.A.float(), update.scaling)
    U32, S32, Vh32 = factored.svd(low)
    R32 = reference.svd(low, k)
    for x, x_ref, y in zip((U32, S32, Vh32), R32, (Ur, Sr, Vhr)):
        assert rel_err(x, y) <= 2 * rel_err(x_ref, y) + 1e-6


def test_project_and_concat_match_dense():
    g = torch.Generator().manual_seed(3)
    updates = [random_update((41, 29), r, g, batch=(2,)) for r in (3, 6, 4)]
    U = torch.linalg.qr(torch.randn(2, 41, 11, generator=g, dtype=torch.float64))[0]
    Vh = torch.linalg.qr(torch.randn(2, 29, 7, generator=g, dtype=torch.float64))[0].mT
    for u in updates:
        assert rel_err(factored.project(U, u, Vh), reference.project(U, u, Vh)) < 1e-12
    total = factored.concat(updates)
    assert total.rank == 13 and rel_err(total.materialize(), reference.concat(updates)) < 1e-13


def test_truncate_reports_the_exact_error_and_rank():
    g = torch.Generator().manual_seed(4)
    update = random_update((60, 35), 12, g)
    B = update.B.clone()
    B[:, 5] = B[:, 0] + B[:, 1]                      # rank 11, not 12
    update = LowRank(B, update.A, update.scaling)
    U, S, _ = factored.svd(update)
    assert int(factored.numerical_rank(S, 60, 35)) == 11
    assert torch.linalg.matrix_rank(update.materialize()) == 11
    short, error = factored.truncate(update, 4)
    full = update.materialize()
    assert short.rank == 4
    assert abs(float(error) - rel_err(short.materialize(), full)) < 1e-12
    assert rel_err(short.materialize(), ref.truncated_svd(full, 4)[0] @ torch.diag(
        ref.truncated_svd(full, 4)[1]) @ ref.truncated_svd(full, 4)[2]) < 1e-10


def test_no_weight_sized_matrix_is_formed():
    """A 100k x 80k update (32 GB in fp32) merges in moments: nothing m x n exists."""
    shapes = {"huge": (100_000, 80_000)}
    g = torch.Generator().manual_seed(5)
    tvs = [{"huge": LowRank(torch.randn(100_000, r, generator=g),
                            torch.randn(r, 80_000, generator=g))} for r in (4, 6, 5)]
    for method in ("score", "tsv", "iso_c", "iso_cts"):
        merged = merge_factored(tvs, shapes, method)["huge"]
        assert merged.shape == shapes["huge"] and merged.rank <= 15


# ---- methods ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,options", CASES)
def test_float64_equals_dense_api_merge(method, options):
    tvs = random_experts(FULL_SHAPES, FULL_RANKS, seed=11)
    fast = merge_factored(tvs, FULL_SHAPES, method, **options)
    api = scoremerge.merge_task_vectors([{k: u.materialize() for k, u in tv.items()}
                                         for tv in tvs], method, **options)
    convention = reference.merge_factored(tvs, FULL_SHAPES, method, **options)
    for key in FULL_SHAPES:
        assert rel_err(dense(fast[key]), api[key]) < 1e-9, key          # api's own error vs ref
        assert rel_err(dense(fast[key]), convention[key]) < 1e-10, key


@pytest.mark.parametrize("method,options", CASES)
def test_low_rank_float64_equals_dense_reference(method, options):
    tvs = random_experts(LOW_SHAPES, LOW_RANKS, seed=12, missing=LOW_MISSING)
    fast = merge_factored(tvs, LOW_SHAPES, method, exclude=["lm"], **options)
    want = reference.merge_factored(tvs, LOW_SHAPES, method, exclude=["lm"], **options)
    for key in LOW_SHAPES:
        assert rel_err(dense(fast[key]), want[key]) < 1e-10, key
        assert dense(fast[key]).dtype == torch.float64
    mean = sum(tv["lm"].materialize() for tv in tvs) / 3
    assert rel_err(dense(fast["lm"]), mean) < 1e-12


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("regime", ["full", "low"])
def test_float32_error_is_earned_from_the_reference(method, options, regime):
    shapes, ranks, missing = (FULL_SHAPES, FULL_RANKS, ()) if regime == "full" else \
        (LOW_SHAPES, LOW_RANKS, LOW_MISSING)
    tv64 = random_experts(shapes, ranks, seed=13, missing=missing)
    tv32 = in_float32(tv64)
    answer = reference.merge_factored(tv64, shapes, method, **options)
    ref32 = reference.merge_factored(tv32, shapes, method, **options)
    fast = merge_factored(tv32, shapes, method, **options)
    for key in shapes:
        assert dense(fast[key]).dtype == torch.float32
        assert rel_err(dense(fast[key]), answer[key]) <= \
            2 * rel_err(ref32[key], answer[key]) + 1e-6, key


def test_convention_reference_is_scoremerge_ref_where_ranks_suffice():
    """The dense side of these tests is tied to scoremerge.ref, not only to itself."""
    tvs = random_experts(FULL_SHAPES, FULL_RANKS, seed=14)
    mats = [{k: u.materialize() for k, u in tv.items()} for tv in tvs]
    for method in ("score", "tsv", "iso_c", "iso_cts"):
        conv = reference.merge_factored(tvs, {"tall": FULL_SHAPES["tall"]}, method)
        want = getattr(ref.methods, method)([tv["tall"] for tv in mats])
        assert rel_err(conv["tall"], want) < 1e-12, method


@pytest.mark.parametrize("method,options", [("magmax", {}), ("ties", {"scope": "tensor"}),
                                            ("ties", {"scope": "tensor", "density": 0.5,
                                                      "zero_sign": "majority"})])
def test_entrywise_methods_materialize_per_key_and_equal_the_api(method, options):
    tvs = random_experts(FULL_SHAPES, FULL_RANKS, seed=15)
    fast = merge_factored(tvs, FULL_SHAPES, method, **options)
    api = scoremerge.merge_task_vectors([{k: u.materialize() for k, u in tv.items()}
                                         for tv in tvs], method, **options)
    # merge_factored materializes each key on a thread of its own, with one intra-op thread;
    # MKL rounds B @ A differently by thread count on some CPUs (AVX-512 EPYC), so the two
    # agree to float64 rounding of the product, not to the bit
    for key in FULL_SHAPES:
        assert rel_err(fast[key], api[key]) < 1e-14, key


def test_refusals():
    tvs = random_experts(FULL_SHAPES, FULL_RANKS, seed=16)
    base = {k: torch.zeros(s, dtype=torch.float64) for k, s in FULL_SHAPES.items()}
    with pytest.raises(MergeInputError, match="scope='tensor'"):
        merge_factored(tvs, FULL_SHAPES, "ties")
    with pytest.raises(MergeInputError, match="not low rank"):
        merge_adapters(base, tvs, "magmax", output="adapter")
    with pytest.raises(MergeInputError, match="needs output='adapter'"):
        merge_adapters(base, tvs, "tsv", rank=3)
    with pytest.raises(MergeInputError, match="the base has no such key"):
        merge_adapters({"tall": base["tall"]}, tvs, "tsv")
    with pytest.raises(MergeInputError, match="unknown option"):
        merge_adapters(base, tvs, "score", varient="diag")
    with pytest.raises(MergeInputError, match="no adapters"):
        merge_adapters(base, [], "score")


def test_merge_adapters_full_and_adapter_outputs_agree():
    tvs = random_experts(LOW_SHAPES, LOW_RANKS, seed=17, missing=LOW_MISSING)
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in LOW_SHAPES.items()}
    full = merge_adapters(base, tvs, "score", alpha=0.7, dtype="float64")
    adapter = merge_adapters(base, tvs, "score", alpha=0.7, output="adapter", dtype="float64")
    short = merge_adapters(base, tvs, "score", alpha=0.7, output="adapter", rank=3,
                           dtype="float64")
    want = reference.merge_factored(tvs, LOW_SHAPES, "score")
    for key in LOW_SHAPES:
        assert full[key].dtype == torch.bfloat16
        assert torch.equal(full[key], (base[key].double() + 0.7 * want[key]).to(torch.bfloat16)) \
            or rel_err(full[key], base[key].double() + 0.7 * want[key]) < 4e-3
        assert rel_err(adapter.updates[key].materialize(), 0.7 * want[key]) < 1e-10
        assert adapter.errors[key] == 0.0 and short.updates[key].rank == 3
        got = rel_err(short.updates[key].materialize(), 0.7 * want[key])
        assert abs(short.errors[key] - got) < 1e-9 and got > 0
