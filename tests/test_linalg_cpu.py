"""The float32 CPU route of truncated_svd and polar (ops/linalg/cpu_float32.py) against float64
torch.linalg.svd, with tolerances earned from float32 torch.linalg.svd's own error on the same
inputs; that it is the route taken; and that its fall-back carries what it declines."""
import pytest
import torch

import scoremerge
from scoremerge import ops, ref
from scoremerge.ops import cpu_matmul
from scoremerge.ops.linalg import cpu_float32 as mixed
from scoremerge.ops.linalg import gram64
from scoremerge.ops.linalg.gram import gram

from conftest import rel_err


@pytest.fixture(autouse=True, params=cpu_matmul.LIBRARIES)
def small_shapes_take_this_route(request, monkeypatch):
    """The route serves min(m, n) >= mixed._MIN_SIZE only (below, the float64 Gram route is as
    fast); these tests use small shapes, so the floor is lowered to test the route itself. Each
    test runs with either library behind the route's float32 products (cpu_matmul.py), every
    product taken, however small."""
    monkeypatch.setattr(mixed, "_MIN_SIZE", 1)
    if request.param == "onednn" and not cpu_matmul._onednn_works():
        pytest.skip("this torch has no working oneDNN linear op")
    monkeypatch.setattr(cpu_matmul, "_chosen", request.param)
    monkeypatch.setattr(cpu_matmul, "_MIN_WORK", 0)
    monkeypatch.setattr(cpu_matmul, "_MIN_ROWS", 0)


def orthonormal(m, r, g):
    return torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]


def with_spectrum(m, n, s, g):
    """float64 [m, n] with singular values s (len <= min(m, n)) and random singular vectors."""
    return (orthonormal(m, len(s), g) * s) @ orthonormal(n, len(s), g).mT


def spectrum(kind, r, g):
    """Singular values: slowly decaying (task vectors' tails), clustered (groups of four equal
    to 1e-6, the cut between groups), or a flat floor under a low-rank part (the case the route
    declines: its top-k directions past the low-rank part are the floor's)."""
    i = torch.arange(r, dtype=torch.float64)
    if kind == "slow":
        return (1 + i) ** -0.5
    if kind == "clustered":
        return (0.9 ** (i // 4)) * (1 + 1e-6 * torch.rand(r, generator=g, dtype=torch.float64))
    floor = 0.3 * (1 + 0.3 * torch.rand(r, generator=g, dtype=torch.float64))
    return torch.where(i < r // 8, 10.0 / (1 + i), 0.0) + floor


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def lowrank_plus_noise(m, n, g):
    """Rank min/8 plus Gaussian noise at the low-rank part's scale (bench/test_merge_cpu.py's
    task vectors, noisier)."""
    r = max(1, min(m, n) // 8)
    return randn(m, r, g=g) @ randn(r, n, g=g) / r + randn(m, n, g=g) / (m * n) ** 0.25


def make_matrix(kind, m, n, g):
    if kind == "lowrank_noise":
        return lowrank_plus_noise(m, n, g)
    return with_spectrum(m, n, spectrum(kind, min(m, n), g), g)


def product(U, s, Vh):
    return (U.double() * s.double()[..., None, :]) @ Vh.double()


def projector(Q):
    Q = Q.double()
    return Q @ Q.mT


def svd_errors(got, A, k):
    """Errors of (U, S, Vh) against float64 SVD: rank-k product, both subspaces, values."""
    U, S, Vh = ref.truncated_svd(A, k)
    return {"product": rel_err(product(*got), product(U, S, Vh)),
            "left": rel_err(projector(got[0]), projector(U)),
            "right": rel_err(projector(got[2].mT), projector(Vh.mT)),
            "values": rel_err(got[1], S)}


def declined(*_):
    raise AssertionError("the fall-back ran on an input the float32 route should take")


@pytest.mark.parametrize("kind", ["slow", "lowrank_noise", "clustered"])
@pytest.mark.parametrize("m,n,k", [(157, 93, 20), (61, 211, 12), (203, 203, 52), (311, 97, 24)])
def test_truncated_svd_within_twice_float32_svd_error(kind, m, n, k, monkeypatch):
    g = torch.Generator().manual_seed(m * n + k)
    A = torch.stack([make_matrix(kind, m, n, g) for _ in range(2)])
    monkeypatch.setattr(mixed.gram64, "truncated_svd", declined)
    got = mixed.truncated_svd(A.float(), k)
    assert all(x.dtype == torch.float32 for x in got)
    for b in range(2):
        ours = svd_errors([x[b] for x in got], A[b], k)
        theirs = svd_errors(ref.truncated_svd(A[b].float(), k), A[b], k)
        for what in ours:
            assert ours[what] <= 2 * theirs[what] + 1e-7, (what, ours[what], theirs[what])


def test_full_rank_svd_of_a_well_conditioned_matrix(monkeypatch):
    g = torch.Generator().manual_seed(5)
    A = with_spectrum(83, 47, torch.linspace(1, 0.1, 47, dtype=torch.float64), g)[None]
    monkeypatch.setattr(mixed.gram64, "truncated_svd", declined)
    U, S, Vh = mixed.truncated_svd(A.float(), 47)
    Ur, Sr, Vhr = ref.truncated_svd(A.float(), 47)
    answer = ref.truncated_svd(A, 47)
    assert rel_err(U @ Vh, answer[0] @ answer[2]) <= 2 * rel_err(Ur @ Vhr, answer[0] @ answer[2])
    assert rel_err(S, answer[1]) <= 2 * rel_err(Sr, answer[1]) + 1e-7


def test_items_past_the_guards_take_the_fall_back():
    """One batch: a well-conditioned item, one of rank 3 < k, an all-zero one, one whose top k
    spans kappa 1e4, and a flat floor under a low-rank part (kappa_k 27, rho 0.9: the
    refinement would reach 5-14x float32 SVD's error). Without the fall-back the last four come
    back wrong or less accurate than the reference."""
    g = torch.Generator().manual_seed(9)
    m, n, k = 71, 45, 8
    A = torch.stack([with_spectrum(m, n, spectrum("slow", n, g), g),
                     with_spectrum(m, n, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), g),
                     torch.zeros(m, n, dtype=torch.float64),
                     with_spectrum(m, n, torch.logspace(0, -4, n, dtype=torch.float64), g),
                     with_spectrum(m, n, spectrum("flat", n, g), g)])
    U, S, Vh = mixed.truncated_svd(A.float(), k)
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
    kept = U[[0, 1, 3, 4]]
    assert torch.allclose(kept.mT @ kept, torch.eye(k).expand(4, k, k), atol=1e-5)
    assert rel_err(product(U[1, :, :3], S[1, :3], Vh[1, :3]), A[1]) < 1e-6
    assert torch.equal(S[2], torch.zeros(k))
    for b in (0, 3, 4):
        ours = svd_errors((U[b], S[b], Vh[b]), A[b], k)
        theirs = svd_errors(ref.truncated_svd(A[b].float(), k), A[b], k)
        for what in ours:
            assert ours[what] <= 2 * theirs[what] + 1e-7, (b, what, ours[what], theirs[what])


def matrix_with_condition(m, n, kappa, g):
    return with_spectrum(m, n, torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(),
                                              min(m, n), dtype=torch.float64), g)


@pytest.mark.parametrize("kappa", [3.0, 12.0])
@pytest.mark.parametrize("m,n", [(233, 61), (59, 59), (47, 190)])
def test_polar_within_twice_float32_svd_error(kappa, m, n, monkeypatch):
    """kappa 3 takes the float32 route as it is, 12 with its Newton-Schulz step."""
    g = torch.Generator().manual_seed(m + n)
    A = torch.stack([matrix_with_condition(m, n, kappa, g) for _ in range(3)])
    monkeypatch.setattr(mixed, "polar_reference", declined)
    got = mixed.polar(A.float())
    for b in range(3):
        answer = ref.polar(A[b])
        assert rel_err(got[b], answer) <= 2 * rel_err(ref.polar(A[b].float()), answer) + 1e-7


def test_ill_conditioned_and_singular_polar_factors_take_the_fall_back():
    """kappa 1e3 (SCORE's square concatenations reach 2e4) and rank 3 of 6: the first as accurate
    as float32 SVD (it is float32 SVD), the second orthonormal. Both fail without the fall-back."""
    g = torch.Generator().manual_seed(3)
    A = torch.stack([matrix_with_condition(40, 40, 1e3, g), torch.zeros(40, 40).double()])
    A[1, :10, :6] = randn(10, 3, g=g) @ randn(3, 6, g=g)
    assert not mixed._well_conditioned(A.float().mT @ A.float()).any()
    P = mixed.polar(A.float())
    answer = ref.polar(A[0])
    assert rel_err(P[0], answer) <= 2 * rel_err(ref.polar(A[0].float()), answer)
    assert torch.allclose(P[1].mT @ P[1], torch.eye(40), atol=1e-5)


def test_the_condition_check_sorts_by_kappa():
    g = torch.Generator().manual_seed(4)
    kappas = (2.0, 10.0, 30.0, 1e3)
    X = torch.stack([matrix_with_condition(90, 50, kappa, g) for kappa in kappas]).float()
    assert mixed._well_conditioned(X.mT @ X).tolist() == [True, True, False, False]


@pytest.mark.parametrize("op", ["truncated_svd", "polar"])
def test_the_torch_backend_takes_this_route_for_float32_on_a_cpu_only(op, monkeypatch):
    """ops -> batched.py (the torch backend's entry points) -> here, for float32 with torch's own
    eigensolver; float64 and other eigensolvers (the cuda backend's) keep the float64 route."""
    seen, real = [], getattr(mixed, op)
    monkeypatch.setattr(mixed, op, lambda A, *args: seen.append(A.dtype) or real(A, *args))
    args = (2,) if op == "truncated_svd" else ()
    getattr(ops, op)(torch.randn(2, 7, 5), *args, backend="torch")
    getattr(ops, op)(torch.randn(2, 7, 5, dtype=torch.float64), *args, backend="torch")
    getattr(gram64, op)(torch.randn(1, 7, 5), *args, eigh=lambda G: torch.linalg.eigh(G))
    assert seen == [torch.float32]


@pytest.mark.parametrize("method", ["score", "tsv", "iso_c", "iso_cts"])
def test_merges_with_slow_spectra_within_twice_the_float32_reference(method):
    """The whole method through ops on CPU float32 (this route), against the float64 answer."""
    g = torch.Generator().manual_seed(11)
    shapes = {"tall": (151, 81), "wide": (81, 151), "square": (81, 81)}
    tv64 = [{key: 1e-3 * with_spectrum(*shape, spectrum("slow", min(shape), g), g)
             for key, shape in shapes.items()} for _ in range(3)]
    tv32 = [{k: v.float() for k, v in tv.items()} for tv in tv64]
    answer = ref.merge_task_vectors(tv64, method)
    ref32 = ref.merge_task_vectors(tv32, method)
    fast = scoremerge.merge_task_vectors(tv32, method, backend="torch")
    for key in shapes:
        assert rel_err(fast[key], answer[key]) <= 2 * rel_err(ref32[key], answer[key]), key


def test_ops_on_cpu_float32_return_canonical_signs_and_float32():
    g = torch.Generator().manual_seed(2)
    A = torch.stack([with_spectrum(37, 23, spectrum("slow", 23, g), g) for _ in range(2)]).float()
    U, S, Vh = ops.truncated_svd(A, 5)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert (torch.gather(U, -2, U.abs().argmax(-2, keepdim=True)) > 0).all()


@pytest.mark.parametrize("op", ["truncated_svd", "polar"])
def test_below_the_size_floor_the_float64_route_serves(op, monkeypatch):
    monkeypatch.setattr(mixed, "_MIN_SIZE", 192)
    seen, real = [], getattr(mixed, op)
    monkeypatch.setattr(mixed, op, lambda A, *args: seen.append(tuple(A.shape)) or real(A, *args))
    args = (2,) if op == "truncated_svd" else ()
    getattr(ops, op)(torch.randn(2, 200, 191), *args, backend="torch")
    getattr(ops, op)(torch.randn(1, 192, 300), *args, backend="torch")
    assert seen == [(1, 192, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,m,n", [(2, 611, 397), (1, 389, 517), (3, 29, 11)])
def test_the_block_row_gram_matrix_is_symmetric_and_as_accurate_as_the_product(b, m, n, dtype):
    """gram.gram builds X^T X from block rows above _MIN_WIDTH (397 and 517 here; 11 is the
    plain product, mirrored): exactly symmetric, within twice the error of float64 that the
    whole product has in the same library (oneDNN's own error was 2.25x MKL's here on the
    Zen 3 EPYC; that error is tests/test_cpu_matmul.py's to bound)."""
    g = torch.Generator().manual_seed(m + n)
    X = randn(b, m, n, g=g)
    answer = X.mT @ X
    got = gram(X.to(dtype))
    assert got.dtype == dtype and torch.equal(got, got.mT)
    plain = cpu_matmul.matmul(X.to(dtype).mT, X.to(dtype))
    for i in range(b):
        assert rel_err(got[i], answer[i]) <= 2 * rel_err(plain[i], answer[i]) + 1e-15


def test_declined_polar_factors_are_the_references_to_the_bit():
    """Items past the guards get float32 SVD and torch's own product, as ref.linalg.polar does,
    whichever library the route's other products take."""
    g = torch.Generator().manual_seed(11)
    A = torch.randn(2, 401, 297, generator=g)
    assert torch.equal(mixed.polar_reference(A), ref.linalg.polar(A))
