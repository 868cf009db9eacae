"""Every method of scoremerge.ref on small cases whose answers are worked out by hand (float64)."""
import math

import pytest
import torch

from scoremerge import ref

D = torch.float64


def diag(*values):
    return torch.diag(torch.tensor(values, dtype=D))


def test_mean_and_task_arithmetic():
    a, b = torch.tensor([1.0, -2.0], dtype=D), torch.tensor([3.0, 4.0], dtype=D)
    assert torch.equal(ref.methods.mean([a, b]), torch.tensor([2.0, 1.0], dtype=D))
    assert torch.equal(ref.methods.task_arithmetic([a, b]), torch.tensor([4.0, 2.0], dtype=D))


def test_magmax_takes_the_largest_magnitude_with_its_sign():
    a, b = torch.tensor([1.0, -3.0], dtype=D), torch.tensor([-2.0, 2.0], dtype=D)
    assert torch.equal(ref.methods.magmax([a, b]), torch.tensor([-2.0, -3.0], dtype=D))


def test_magmax_takes_the_later_task_on_equal_magnitudes():
    # |2| = |-2| in entry 0 (b is later), all three tie in entry 1 (c), |3| = |-3| in entry 2 (c)
    a = torch.tensor([2.0, -1.0, 3.0], dtype=D)
    b = torch.tensor([-2.0, 1.0, 1.0], dtype=D)
    c = torch.tensor([1.0, -1.0, -3.0], dtype=D)
    assert torch.equal(ref.methods.magmax([a, b, c]), torch.tensor([-2.0, -1.0, -3.0], dtype=D))
    assert torch.equal(ref.methods.magmax([c, b, a]), torch.tensor([2.0, -1.0, 3.0], dtype=D))


def test_ties_trim_elect_disjoint_mean():
    t1 = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=D)}
    t2 = {"w": torch.tensor([-1.0, -1.5, 1.0, 4.0], dtype=D)}
    # density 0.5 keeps two entries each: t1 -> [0, -2, 3, 0], t2 -> [0, -1.5, 0, 4];
    # elected signs [0, -, +, +]; agreeing means [0, -1.75, 3, 4].
    out = ref.methods.ties([t1, t2], ["w"], density=0.5, scope="tensor")["w"]
    assert torch.equal(out, torch.tensor([0.0, -1.75, 3.0, 4.0], dtype=D))


def test_ties_disjoint_sum_and_max():
    t1 = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=D)}
    t2 = {"w": torch.tensor([-1.0, -1.5, 1.0, 4.0], dtype=D)}
    # kept as above, [0, -2, 3, 0] and [0, -1.5, 0, 4]; agreeing values -2 and -1.5, 3, 4
    summed = ref.methods.ties([t1, t2], ["w"], density=0.5, scope="tensor", disjoint="sum")["w"]
    largest = ref.methods.ties([t1, t2], ["w"], density=0.5, scope="tensor", disjoint="max")["w"]
    assert torch.equal(summed, torch.tensor([0.0, -3.5, 3.0, 4.0], dtype=D))
    assert torch.equal(largest, torch.tensor([0.0, -2.0, 3.0, 4.0], dtype=D))


def test_ties_zero_sign_majority():
    t1 = {"w": torch.tensor([2.0, 1.0, 3.0, -1.0], dtype=D)}
    t2 = {"w": torch.tensor([-2.0, 1.0, 1.0, -1.0], dtype=D)}
    # everything kept; sums [0, 2, 4, -2]: entry 0 cancels exactly. Elected elsewhere: +, +, -:
    # two + against one -, so entry 0 takes + and its agreeing value 2.
    zero = ref.methods.ties([t1, t2], ["w"], density=1.0)["w"]
    majority = ref.methods.ties([t1, t2], ["w"], density=1.0, zero_sign="majority")["w"]
    assert torch.equal(zero, torch.tensor([0.0, 1.0, 2.0, -1.0], dtype=D))
    assert torch.equal(majority, torch.tensor([2.0, 1.0, 2.0, -1.0], dtype=D))
    t2["w"][1] = -1.0     # entries 0 and 1 cancel; the others elect + and -: no majority
    tie = ref.methods.ties([t1, t2], ["w"], density=1.0, zero_sign="majority")["w"]
    assert torch.equal(tie, torch.tensor([0.0, 0.0, 2.0, -1.0], dtype=D))


def test_ties_global_scope_ranks_across_keys():
    t1 = {"a": torch.tensor([10.0, 1.0], dtype=D), "b": torch.tensor([2.0, 3.0], dtype=D)}
    # global top half of [10, 1, 2, 3] is {10, 3}; per tensor it would be {10} and {3}: same here,
    # but with density 0.75 global keeps {10, 3, 2}, per tensor {10, 1} (round(1.5)=2) and {2, 3}.
    g = ref.methods.ties([t1], ["a", "b"], density=0.75, scope="global")
    t = ref.methods.ties([t1], ["a", "b"], density=0.75, scope="tensor")
    assert g["a"].tolist() == [10.0, 0.0] and g["b"].tolist() == [2.0, 3.0]
    assert t["a"].tolist() == [10.0, 1.0] and t["b"].tolist() == [2.0, 3.0]


def test_score_and_tsv_on_orthogonal_tasks_equal_the_sum():
    # Tasks living in orthogonal subspaces have nothing to resolve: Ustar = Vstar = I.
    taus = [diag(3.0, 0.0), diag(0.0, 2.0)]
    for variant in ("full", "diag", "untrimmed"):
        assert torch.allclose(ref.methods.score(taus, variant=variant), diag(3.0, 2.0))
    assert torch.allclose(ref.methods.score(taus, variant="offdiag"), torch.zeros(2, 2, dtype=D))
    assert torch.allclose(ref.methods.tsv(taus), diag(3.0, 2.0))


def test_masking_drops_the_outlier_and_keeps_the_rest():
    M = torch.tensor([[1.0, 0.1, 5.0], [0.1, 2.0, 0.1], [0.1, 0.1, 3.0]], dtype=D)
    # Off-diagonal with zeroed diagonal: three 0s, five 0.1s, one 5: mean 5.5/9, and
    # sd = sqrt((3 * mu^2 + 5 * (0.1 - mu)^2 + (5 - mu)^2) / 8) = 1.6466.
    mu = 5.5 / 9
    sd = math.sqrt((3 * mu**2 + 5 * (0.1 - mu) ** 2 + (5 - mu) ** 2) / 8)
    assert abs(sd - 1.6466) < 1e-4
    eye = torch.eye(3, dtype=D)
    S = ref.project_and_mask(M[None], eye, eye)          # threshold 1.96 * sd: 5 is dropped
    expected = M.clone()
    expected[0, 2] = 0.0
    assert torch.allclose(S, expected)
    S = ref.project_and_mask(M[None], eye, eye, trim_multiplier=3.0)   # 3 * sd > |5 - mu|
    assert torch.allclose(S, M)


def test_trim_per_task_divides_the_threshold_by_T():
    M = torch.tensor([[0.0, 1.0], [3.0, 0.0]], dtype=D)
    eye = torch.eye(2, dtype=D)
    # mean 1, sd = sqrt((1 + 0 + 4 + 1) / 3) = sqrt(2); with T = 2 copies the threshold is
    # 1.96 * sqrt(2) / 2 = 1.386 < |3 - 1|: the 3 goes; without /T, 2.77 > 2: it stays.
    both = torch.stack([M, M])
    assert torch.allclose(ref.project_and_mask(both, eye, eye, variant="offdiag"),
                          torch.tensor([[0.0, 2.0], [0.0, 0.0]], dtype=D))
    assert torch.allclose(ref.project_and_mask(both, eye, eye, variant="offdiag",
                                               trim_per_task=False), 2 * M)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    out = ref.methods.iso_c([diag(3.0, 0.0), diag(0.0, 1.0)])
    assert torch.allclose(out, diag(2.0, 2.0))


def test_keys_thinner_than_the_task_count_route_per_method():
    # T = 3 tasks on a 2x2 key and a 1x2 key: SCORE and TSV-M would have k = 0 directions per
    # task and take the mean; Iso-C and Iso-CTS flatten the spectrum of the sum, diag(3, 1) ->
    # diag(2, 2) (Iso-CTS: c = int(1.6) = 1, round(1 / 3) * 3 = 0 task directions, so c = 2),
    # and a single row keeps its one singular value: the sum [3, 4].
    square = [diag(3.0, 0.0), diag(0.0, 1.0), diag(0.0, 0.0)]
    row = [torch.tensor([[3.0, 0.0]], dtype=D), torch.tensor([[0.0, 4.0]], dtype=D),
           torch.zeros(1, 2, dtype=D)]
    tvs = [{"square": s, "row": r} for s, r in zip(square, row)]
    for method in ("iso_c", "iso_cts"):
        out = ref.merge_task_vectors(tvs, method)
        assert torch.allclose(out["square"], diag(2.0, 2.0)), method
        assert torch.allclose(out["row"], torch.tensor([[3.0, 4.0]], dtype=D)), method
    for method in ("score", "tsv"):
        out = ref.merge_task_vectors(tvs, method)
        assert torch.allclose(out["square"], diag(1.0, 1.0 / 3)), method
        assert torch.allclose(out["row"], torch.tensor([[1.0, 4.0 / 3]], dtype=D)), method


def test_iso_cts_sizes_follow_the_rounding_rule():
    assert ref.methods.iso_cts_sizes(768, 3) == (615, 51)     # c = 614, round(154 / 3) = 51
    assert ref.methods.iso_cts_sizes(10, 8) == (10, 0)        # round(2 / 8) = 0
    assert ref.methods.iso_cts_sizes(5, 2) == (5, 0)          # round(0.5) = 0, half to even


def test_iso_cts_with_the_whole_rank_common_is_iso_c():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(9, 6, generator=g, dtype=D) for _ in range(3)]
    assert torch.allclose(ref.methods.iso_cts(taus, common_space_fraction=1.0), ref.methods.iso_c(taus))


@pytest.mark.parametrize("variant", ["full", "diag", "untrimmed"])
def test_one_task_returns_its_task_vector(variant):
    tau = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=D)
    assert torch.allclose(ref.methods.score([tau], variant=variant), tau)
    assert torch.allclose(ref.methods.tsv([tau]), tau)


def test_canonical_signs_make_the_largest_entry_positive():
    U = torch.tensor([[0.6, -0.8], [-0.8, -0.6]], dtype=D)
    Vh = torch.eye(2, dtype=D)
    U2, Vh2 = ref.canonical_signs(U, Vh)
    assert U2.tolist() == [[-0.6, 0.8], [0.8, 0.6]]
    assert Vh2.tolist() == [[-1.0, 0.0], [0.0, -1.0]]
    assert torch.allclose(U @ Vh, U2 @ Vh2)
