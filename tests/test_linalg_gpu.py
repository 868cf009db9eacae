"""ops.truncated_svd and ops.polar on a GPU (issue 6), backend "cuda" and "auto" (which takes cuda
there), against float64 torch.linalg.svd on the CPU; then SCORE, TSV-M and Iso-CTS merges with
backend="cuda" against the per-key reference in float64. Skipped without CUDA.

Bounds, per batch item; s* are the float64 singular values of the input as the op received it
(rounded to fp32 for fp32 runs), s*_1 the largest; tol = 1e-5 for fp32 (issue 6), 1e-10 for fp64.
- Singular values: |s_i - s*_i| <= tol * s*_1. Relative to s*_1, not to s*_i: any backward-stable
  SVD in precision eps moves every singular value by up to about eps * ||A||_2 = eps * s*_1 (Weyl),
  so that is the accuracy a small s*_i can have; fp32's eps is 6e-8, so 1e-5 leaves ~170x for growth
  with size. An all-zero item must come out exactly zero.
- Rank-k reconstruction: e = ||A - U diag(S) Vh||_F against the exact truncated error
  e* = (sum_{i>k} s*_i^2)^(1/2): e <= hypot((1 + tol) e*, tol ||A||_F). Where e* is not small this
  is "within tol relative of e*" (the issue's words); where e* ~ 0 (rank <= k) it is
  e <= tol ||A||_F. It holds for fp32 factors because any rank-k U S Vh near A_k exceeds e* only
  at second order (A - A_k is orthogonal to A_k's row and column spaces): rounding U, S, Vh to
  fp32 adds about (eps32 ||A||)^2 to e^2.
- Orthonormality: max |U^T U - I| and max |Vh Vh^T - I|. fp32: <= tol. fp64: the Gram route
  (ops/linalg/gram64.py) derives one factor as X V / s from the eigenvectors of a float64 Gram
  matrix, so its columns are orthogonal only to about eps64 * kappa^2 (kappa = s*_1 / s*_k) up to
  kappa = 1e4, past which the item is recomputed by SVD: bound max(1e-10, GRAM_C * eps64 * kappa^2)
  (kappa < 1e4), else 1e-10. GRAM_C: see its comment.
- Signs (ALGORITHMS.md): ref.canonical_signs leaves U and Vh unchanged, and U's columns point the
  way ops.truncated_svd's columns on the CPU do, wherever a column is determined (singular value
  separated from its neighbours by 1e-3 s*_1); inside a cluster of singular values only the
  subspace is determined, and that is what is compared.
- Polar: fp32 within 2x the fp32 reference's own error (ref.polar on the same device) + 1e-6, as
  tests/test_ops.py; fp64 within max(1e-10, GRAM_C * eps64 * kappa^2) (kappa < 1e4, else
  kappa^1: SVD), kappa = s_max / s_min of the input.
- Merges: relative Frobenius error per key against backend="reference" in float64 within
  max(2x the fp32 reference's own, 1e-3) (issue 6).
"""
import functools
import math

import pytest
import torch

import scoremerge
from scoremerge import backend, ops, ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = "cuda"
BACKENDS = ("cuda", "auto")
DTYPES = (torch.float32, torch.float64)
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
EPS64 = torch.finfo(torch.float64).eps
# The Gram route's fp64 errors are c * eps64 * kappa^2, c from the growth of the float64 Gram
# product's and the eigensolver's backward errors with size. Measured with torch's eigensolver on
# the CPU on these inputs: c <= 0.2 where kappa > 100 (and the bound exceeds the 1e-10 floor only
# past kappa ~ 700); 100 leaves cuSOLVER's eigensolver 500x.
GRAM_C = 100.0
MAX_KAPPA = 1e4          # ops/linalg/gram64.py's _MAX_KAPPA: beyond it, items are redone by SVD


def generator(seed):
    return torch.Generator().manual_seed(seed)


def gaussian(*shape, seed):
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64)


def low_rank(*lead, m, n, rank, noise, seed):
    """A rank-`rank` matrix with unit-variance entries plus `noise` times Gaussian noise: the
    decaying spectrum of a fine-tuning update."""
    g = generator(seed)
    L = torch.randn(*lead, m, rank, generator=g, dtype=torch.float64)
    R = torch.randn(*lead, rank, n, generator=g, dtype=torch.float64)
    return L @ R / math.sqrt(rank) + noise * torch.randn(*lead, m, n, generator=g,
                                                         dtype=torch.float64)


def orthonormal(*lead, m, p, seed):
    return torch.linalg.qr(gaussian(*lead, m, p, seed=seed))[0]


# Clustered spectrum: CLUSTER_SIZE singular values 1e-7 apart at each centre, then a tail.
CLUSTER_CENTRES, CLUSTER_SIZE = (1.0, 0.5, 0.25, 0.125), 8


def clustered(B, m, n, seed):
    r = min(m, n)
    s = torch.cat([c + 1e-7 * torch.arange(CLUSTER_SIZE, 0, -1, dtype=torch.float64)
                   for c in CLUSTER_CENTRES])
    s = torch.cat([s, torch.linspace(0.05, 0.01, r - len(s), dtype=torch.float64)])
    U, V = orthonormal(B, m=m, p=r, seed=seed), orthonormal(B, m=n, p=r, seed=seed + 1)
    return (U * s) @ V.mT


def vit_like(m, n, seed):
    """Three items: Gaussian, a task-vector-like low-rank-plus-noise (scale 1e-3), and low rank
    plus small noise (kappa at k in the hundreds)."""
    rank = min(m, n) // 8
    return torch.stack([gaussian(m, n, seed=seed),
                        1e-3 * low_rank(m=m, n=n, rank=rank, noise=0.1, seed=seed + 1),
                        low_rank(m=m, n=n, rank=rank, noise=1e-2, seed=seed + 2)])


def rank_deficient(seed):
    """Item 0 all zeros (a layer nobody changed), item 1 rank 4 < k, item 2 Gaussian."""
    A = torch.zeros(3, 40, 30, dtype=torch.float64)
    A[1] = low_rank(m=40, n=30, rank=4, noise=0.0, seed=seed)
    A[2] = gaussian(40, 30, seed=seed + 1)
    return A


def mixed_scales(seed):
    """Low rank 5 plus noise at three levels: kappa at k = 10 about 25, 2500 and 2.5e5 (the last
    past MAX_KAPPA: recomputed by SVD)."""
    return torch.stack([low_rank(m=64, n=48, rank=5, noise=noise, seed=seed + i)
                        for i, noise in enumerate((1e-1, 1e-3, 1e-5))])


# name: (builder, k values). Odd sizes, tall and wide, a non-contiguous view, leading dims.
SVD_CASES = {
    "random_37x23": (lambda: gaussian(3, 37, 23, seed=1), (7, 23)),
    "random_23x37_view": (lambda: gaussian(3, 37, 23, seed=2).mT, (11,)),
    "random_130x97": (lambda: gaussian(2, 130, 97, seed=3), (40,)),
    "leading_dims_3x2x29x41": (lambda: gaussian(3, 2, 29, 41, seed=4), (9,)),
    "low_rank_plus_noise": (lambda: low_rank(4, m=64, n=48, rank=5, noise=1e-3, seed=5), (3, 10)),
    "mixed_scales": (lambda: mixed_scales(seed=6), (10,)),
    "rank_deficient": (lambda: rank_deficient(seed=7), (8,)),
    "clustered_130x97": (lambda: clustered(2, 130, 97, seed=8), (16, 20, 32)),
    "vit_768x768": (lambda: vit_like(768, 768, seed=9), (153,)),
    "vit_3072x768": (lambda: vit_like(3072, 768, seed=12), (153,)),
    "vit_768x3072": (lambda: vit_like(768, 3072, seed=15), (153,)),
}
CLUSTERED = {"clustered_130x97"}
SMALL = [name for name in SVD_CASES if not name.startswith("vit")]


@functools.cache
def svd_case(name, dtype):
    """(A in dtype on the CPU, float64 thin SVD of A on the CPU); cached across tests."""
    A = SVD_CASES[name][0]().to(dtype)
    return A, torch.linalg.svd(A.double(), full_matrices=False)


@functools.cache
def cpu_ops_svd(name, dtype, k):
    A, _ = svd_case(name, dtype)
    return ops.truncated_svd(A, k, backend="torch")


def relative_errors(x, answer):
    """Relative Frobenius error of each item of x [b, ...] against answer [b, ...], in float64.
    (Not conftest.rel_err: that name is bench/conftest.py's when tests and benchmarks are
    collected in one run.)"""
    x, answer = x.double().flatten(1), answer.double().flatten(1)
    return (x - answer).norm(dim=1) / answer.norm(dim=1)


def orthonormality_error(Q):
    """max |Q^T Q - I| per item, Q [b, m, p] (columns)."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (Q.mT @ Q - eye).abs().flatten(-2).amax(-1)


def orthonormality_tol(dtype, kappa):
    """Per-item bound on orthonormality_error for the Gram route (module docstring)."""
    if dtype == torch.float32:
        return torch.full_like(kappa, TOL[dtype])
    gram = (GRAM_C * EPS64 * kappa**2).clamp_min(TOL[dtype])
    return torch.where(kappa < MAX_KAPPA, gram, TOL[dtype])


def check_truncated_svd(name, dtype, k, backend_name):
    A, (Ur, Sr, Vhr) = svd_case(name, dtype)
    tol = TOL[dtype]
    A_dev = A.to(DEVICE)
    U, S, Vh = ops.truncated_svd(A_dev, k, backend=backend_name)
    lead, (m, n) = A.shape[:-2], A.shape[-2:]
    assert (U.shape, S.shape, Vh.shape) == ((*lead, m, k), (*lead, k), (*lead, k, n))
    assert U.dtype == S.dtype == Vh.dtype == dtype
    assert U.device == S.device == Vh.device == A_dev.device
    U, S, Vh = (x.cpu().double().reshape(-1, *x.shape[len(lead):]) for x in (U, S, Vh))
    A64, Ur, Sr = A.double().reshape(-1, m, n), Ur.reshape(-1, m, Ur.shape[-1]), Sr.reshape(-1, Sr.shape[-1])
    assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()

    s1 = Sr[:, 0]
    sv_err = (S - Sr[:, :k]).abs().amax(-1)
    assert (sv_err <= tol * s1).all(), (sv_err / s1).tolist()

    e = (A64 - (U * S[:, None, :]) @ Vh).flatten(-2).norm(dim=-1)
    e_star = Sr[:, k:].norm(dim=-1)
    bound = torch.hypot((1 + tol) * e_star, tol * A64.flatten(-2).norm(dim=-1))
    assert (e <= bound).all(), ((e - e_star) / bound).tolist()

    kappa = s1 / Sr[:, k - 1]                      # inf for an item of rank < k: SVD
    orth_tol = orthonormality_tol(dtype, kappa)
    for Q in (U, Vh.mT):
        err = orthonormality_error(Q)
        assert (err <= orth_tol).all(), (err.tolist(), orth_tol.tolist())

    U_c, Vh_c = ref.canonical_signs(U, Vh)         # ALGORITHMS.md's convention holds as returned
    assert torch.equal(U_c, U) and torch.equal(Vh_c, Vh)
    U_cpu = cpu_ops_svd(name, dtype, k)[0].double().reshape(-1, m, k)
    padded = torch.cat([torch.full_like(s1[:, None], math.inf), Sr,
                        torch.zeros_like(s1[:, None])], dim=1)
    gap = torch.minimum(padded[:, :-2] - padded[:, 1:-1], padded[:, 1:-1] - padded[:, 2:])
    determined = (gap[:, :k] > 1e-3 * s1[:, None]) & (Sr[:, :k] > 1e-3 * s1[:, None])
    agree = (U * U_cpu).sum(dim=-2)
    assert (agree[determined] > 0.99).all(), agree[determined].min()
    if name in CLUSTERED:
        check_cluster_subspaces(U, Ur, k, tol)


def check_cluster_subspaces(U, Ur, k, tol):
    """Each cluster inside the top k spans the reference's subspace (projectors agree)."""
    for start in range(0, k - CLUSTER_SIZE + 1, CLUSTER_SIZE):
        block = slice(start, start + CLUSTER_SIZE)
        P, Pr = U[..., block] @ U[..., block].mT, Ur[..., block] @ Ur[..., block].mT
        err = (P - Pr).flatten(-2).norm(dim=-1)
        assert (err <= tol).all(), (start, err.tolist())


def test_the_cuda_backend_is_available():
    """On a GPU machine the CUDA path must be there: a missing or stale extension fails here
    (and backend="cuda" below raises) instead of the tests silently measuring torch."""
    assert backend.unavailable_reason("cuda", torch.device(DEVICE)) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", SMALL)
def test_truncated_svd_small(name, backend_name, dtype):
    for k in SVD_CASES[name][1]:
        check_truncated_svd(name, dtype, k, backend_name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", [n for n in SVD_CASES if n.startswith("vit")])
def test_truncated_svd_vit_sizes(name, dtype):
    for k in SVD_CASES[name][1]:
        check_truncated_svd(name, dtype, k, "cuda")


def shared_subspace(m, p, tilt, seed):
    """[U1, U2, U3] (m x 3p): U2 is U1 tilted by `tilt`, U3 independent: experts sharing a
    subspace, the ill-conditioned polar input of tests/test_ops.py (m = 64, p = 16, 1e-4)."""
    U1 = orthonormal(m=m, p=p, seed=seed)
    U2 = torch.linalg.qr(U1 + tilt * gaussian(m, p, seed=seed + 1))[0]
    return torch.cat([U1, U2, orthonormal(m=m, p=p, seed=seed + 2)], dim=1)[None]


def score_concatenation(m, n, T, seed):
    """[Ucat, Vcat^T] of SCORE for T task-like matrices sharing a low-rank part (float64)."""
    common = low_rank(m=m, n=n, rank=min(m, n) // 16, noise=0.0, seed=seed)
    taus = common + low_rank(T, m=m, n=n, rank=min(m, n) // 16, noise=0.1, seed=seed + 1)
    U, _, Vh = ref.truncated_svd(taus, min(m, n) // T)
    return U.permute(1, 0, 2).reshape(m, -1)[None], Vh.reshape(-1, n)[None]


POLAR_CASES = {
    "random_3x37x23": lambda: gaussian(3, 37, 23, seed=20),
    "random_2x23x37": lambda: gaussian(2, 23, 37, seed=21),
    "leading_dims_2x2x29x29": lambda: gaussian(2, 2, 29, 29, seed=22),
    "shared_subspace_64x48": lambda: shared_subspace(64, 16, 1e-4, seed=4),
    "shared_subspace_768x384": lambda: shared_subspace(768, 128, 1e-4, seed=23),
    "score_Ucat_200x150": lambda: score_concatenation(200, 150, 5, seed=26)[0],
    "score_Vcat_150x150": lambda: score_concatenation(200, 150, 5, seed=26)[1],
}


@functools.cache
def polar_case(name):
    """(A float64 on the CPU, ref.polar(A), per-item condition number)."""
    A = POLAR_CASES[name]()
    s = torch.linalg.svdvals(A)
    return A, ref.polar(A), (s[..., 0] / s[..., -1]).reshape(-1)


def polar_tol64(kappa):
    growth = kappa**2 if kappa < MAX_KAPPA else kappa
    return max(TOL[torch.float64], GRAM_C * EPS64 * growth)


def check_polar_shape_and_orthonormality(P, A, dtype):
    assert P.shape == A.shape and P.dtype == dtype and P.device.type == torch.device(DEVICE).type
    P = P.cpu().double().reshape(-1, *A.shape[-2:])
    assert torch.isfinite(P).all()
    Q = P if A.shape[-2] >= A.shape[-1] else P.mT
    return P, orthonormality_error(Q)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("name", list(POLAR_CASES))
def test_polar(name, backend_name, dtype):
    A, answer, kappa = polar_case(name)
    P, orth_err = check_polar_shape_and_orthonormality(
        ops.polar(A.to(device=DEVICE, dtype=dtype), backend=backend_name), A, dtype)
    answer = answer.reshape(P.shape)
    err = relative_errors(P, answer)
    if dtype == torch.float32:
        ref32 = ref.polar(A.to(device=DEVICE, dtype=dtype)).cpu().reshape(P.shape)
        bound = 2 * relative_errors(ref32, answer) + 1e-6
        orth_bound = torch.full_like(bound, TOL[dtype])
    else:
        bound = orth_bound = torch.tensor([polar_tol64(x) for x in kappa.tolist()],
                                          dtype=torch.float64)
    assert (err <= bound).all(), (err.tolist(), bound.tolist())
    assert (orth_err <= orth_bound).all(), (orth_err.tolist(), orth_bound.tolist())


def test_shared_subspace_inputs_are_ill_conditioned():
    """The polar inputs above cover both sides of MAX_KAPPA: the 768-row one is taken by the Gram
    route (where squaring kappa in fp32 would fail the bound), the 64-row one by the SVD."""
    assert 1e3 < polar_case("shared_subspace_768x384")[2].item() < MAX_KAPPA
    assert polar_case("shared_subspace_64x48")[2].item() > MAX_KAPPA


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_polar_of_singular_inputs(backend_name, dtype):
    """A rank-3 10x6 item and an all-zero one: the polar factor is not unique, but it is
    orthonormal, it maps A's row space as the SVD does (P v_i = u_i for s_i > 0), and P^T A is
    symmetric positive semi-definite."""
    A = torch.stack([gaussian(10, 3, seed=30) @ gaussian(3, 6, seed=31),
                     torch.zeros(10, 6, dtype=torch.float64)])
    A = A.to(dtype).double()
    P, orth_err = check_polar_shape_and_orthonormality(
        ops.polar(A.to(device=DEVICE, dtype=dtype), backend=backend_name), A, dtype)
    tol = TOL[dtype]
    assert (orth_err <= tol).all(), orth_err.tolist()
    U, S, Vh = torch.linalg.svd(A[0], full_matrices=False)
    assert ((P[0] @ Vh[:3].mT - U[:, :3]).abs().max() <= tol * 10)
    H = P[0].mT @ A[0]
    assert (H - H.mT).abs().max() <= tol * 10 * S[0]
    assert torch.linalg.eigvalsh((H + H.mT) / 2).min() >= -tol * 10 * S[0]


# End to end. Odd shapes, two keys of one shape (batched together), tall and wide, a 1-D key, a
# key too thin for T tasks (mean path), an all-zero key (output exactly zero), and a key one task
# left unchanged: that task's singular vectors are arbitrary (cuSOLVER's and LAPACK's choices for
# a zero matrix differ), and through the shared basis so is the merge: only finite is checked
# there, as in tests/test_methods_match_reference.py.
E2E_SHAPES = {"blocks.0.qkv": (45, 29), "blocks.1.qkv": (45, 29), "blocks.0.proj": (29, 29),
              "blocks.0.fc1": (53, 29), "blocks.0.fc2": (29, 53), "wide": (17, 61),
              "blocks.0.norm": (29,), "thin": (2, 40), "zero": (23, 31), "one_task_zero": (31, 23)}


def e2e_task_vectors(T, seed):
    """T task vectors in float64 on the CPU: a low-rank part shared by all tasks plus each task's
    own low-rank part and noise, so that their singular subspaces overlap as fine-tuned experts'
    do."""
    tvs = [{} for _ in range(T)]
    for i, (key, shape) in enumerate(E2E_SHAPES.items()):
        if len(shape) == 1:
            values = 1e-3 * gaussian(T, *shape, seed=seed + 10 * i)
        else:
            m, n = shape
            rank = max(1, min(m, n) // 6)
            common = low_rank(m=m, n=n, rank=rank, noise=0.0, seed=seed + 10 * i)
            own = low_rank(T, m=m, n=n, rank=rank, noise=0.1, seed=seed + 10 * i + 1)
            values = 1e-3 * (common + own)
        for t in range(T):
            tvs[t][key] = values[t].clone()
    for tv in tvs:
        tv["zero"].zero_()
    tvs[0]["one_task_zero"].zero_()
    return tvs


@functools.cache
def e2e_answers(method, T):
    """(task vectors float64, the float64 and fp32 references on the CPU)."""
    tv64 = e2e_task_vectors(T, seed=40 + T)
    tv32 = [{k: v.float() for k, v in tv.items()} for tv in tv64]
    return (tv64, scoremerge.merge_task_vectors(tv64, method, backend="reference"),
            scoremerge.merge_task_vectors(tv32, method, backend="reference"))


def merge_error(value, answer):
    return relative_errors(value.cpu()[None], answer[None]).item()


def check_merge(got, answer, bound_for, dtype):
    assert list(got) == list(answer)
    for key, value in got.items():
        assert value.dtype == dtype and value.device.type == torch.device(DEVICE).type, key
        if key == "zero":
            assert torch.equal(value.cpu(), torch.zeros(E2E_SHAPES[key], dtype=dtype))
        elif key == "one_task_zero":
            assert torch.isfinite(value).all()
        else:
            assert merge_error(value, answer[key]) <= bound_for(key), key


@pytest.mark.parametrize("T", [3, 5])
@pytest.mark.parametrize("method", ["score", "tsv", "iso_cts"])
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_merges_match_the_float64_reference(method, T, backend_name):
    tv64, answer, ref32 = e2e_answers(method, T)
    tv_dev = [{k: v.to(device=DEVICE, dtype=torch.float32) for k, v in tv.items()} for tv in tv64]
    got = scoremerge.merge_task_vectors(tv_dev, method, backend=backend_name)
    check_merge(got, answer, lambda key: max(2 * merge_error(ref32[key], answer[key]), 1e-3),
                torch.float32)


@pytest.mark.parametrize("T", [3, 5])
def test_score_in_float64(T):
    """fp64 through the Gram route: polar factors of kappa <= 1e4 to ~eps64 * kappa^2 (~1e-8),
    so 1e-6 (no fp32 reference to earn it from)."""
    tv64, answer, _ = e2e_answers("score", T)
    got = scoremerge.merge_task_vectors([{k: v.to(DEVICE) for k, v in tv.items()} for tv in tv64],
                                        "score", backend="cuda")
    check_merge(got, answer, lambda key: 1e-6, torch.float64)
