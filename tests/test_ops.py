"""ops.truncated_svd, ops.polar, ops.project_and_mask, ops.reconstruct against scoremerge.ref."""
import pytest
import torch

from scoremerge import BackendUnavailableError, ops, ref
from scoremerge.ops.projection import batched as projection_batched

from conftest import rel_err

SHAPES = [(3, 17, 11), (2, 11, 17), (4, 13, 13), (1, 40, 7)]


def randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
def test_truncated_svd_equals_reference(shape):
    A = randn(*shape)
    k = min(shape[-2:]) // 2
    U, S, Vh = ops.truncated_svd(A, k)
    Ur, Sr, Vhr = ref.truncated_svd(A, k)
    assert U.shape == Ur.shape and S.shape == Sr.shape and Vh.shape == Vhr.shape
    assert torch.allclose(S, Sr, atol=1e-12) and torch.allclose(U, Ur, atol=1e-9)
    assert torch.allclose(Vh, Vhr, atol=1e-9)


def test_truncated_svd_leading_dims_and_float32():
    A = randn(2, 3, 9, 6, dtype=torch.float32)
    U, S, Vh = ops.truncated_svd(A, 4)
    assert U.shape == (2, 3, 9, 4) and S.shape == (2, 3, 4) and Vh.shape == (2, 3, 4, 6)
    assert U.dtype == torch.float32
    _, Sr, _ = ref.truncated_svd(A.double(), 4)
    assert rel_err(S, Sr) < 1e-6


def test_truncated_svd_rank_deficient_and_zero():
    A = torch.zeros(3, 12, 8, dtype=torch.float64)
    A[1] = randn(12, 2) @ randn(2, 8, seed=1)             # rank 2, asked for 4
    U, S, Vh = ops.truncated_svd(A, 4)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    assert torch.allclose(U.mT @ U, torch.eye(4, dtype=torch.float64).expand(3, 4, 4), atol=1e-10)
    assert torch.allclose(U[1, :, :2] * S[1, :2] @ Vh[1, :2], A[1], atol=1e-10)
    assert torch.equal(S[0], torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_equals_reference(shape):
    A = randn(*shape, seed=3)
    assert rel_err(ops.polar(A), ref.polar(A)) < 1e-10


def test_polar_when_experts_share_a_subspace():
    """The ill-conditioned case: task 2's singular vectors are task 1's plus a 1e-4 tilt.
    float32 result within 2x of the float32 reference's error against float64."""
    U1 = torch.linalg.qr(randn(64, 16, seed=4))[0]
    U2 = torch.linalg.qr(U1 + 1e-4 * randn(64, 16, seed=5))[0]
    Ucat = torch.cat([U1, U2, torch.linalg.qr(randn(64, 16, seed=6))[0]], dim=1)[None]
    assert torch.linalg.cond(Ucat[0]) > 1e3
    answer = ref.polar(Ucat)
    err_ref32 = rel_err(ref.polar(Ucat.float()), answer)
    assert rel_err(ops.polar(Ucat.float()), answer) <= 2 * err_ref32 + 1e-6


def test_polar_of_a_singular_matrix_is_orthonormal():
    A = randn(1, 10, 3) @ randn(1, 3, 6, seed=1)           # rank 3 of 6
    P = ops.polar(A)
    assert torch.allclose(P.mT @ P, torch.eye(6, dtype=torch.float64)[None], atol=1e-10)


@pytest.mark.parametrize("variant", ["full", "diag", "offdiag", "untrimmed"])
@pytest.mark.parametrize("m,n,p", [(19, 13, 9), (13, 19, 12)])
def test_project_and_mask_equals_reference(variant, m, n, p):
    B, T = 3, 4
    tau = randn(B, T, m, n, seed=1)
    Ustar, Vstar = ops.polar(randn(B, m, p, seed=2)), ops.polar(randn(B, p, n, seed=3))
    S = ops.project_and_mask(tau, Ustar, Vstar, variant=variant, trim_multiplier=1.0)
    for b in range(B):
        want = ref.project_and_mask(tau[b], Ustar[b], Vstar[b], variant=variant, trim_multiplier=1.0)
        assert rel_err(S[b], want) < 1e-12


@pytest.mark.parametrize("variant", ["full", "diag", "offdiag", "untrimmed"])
@pytest.mark.parametrize("m,n,p", [(37, 23, 21), (23, 41, 22)])
def test_project_and_mask_in_float32_is_as_accurate_as_the_reference(variant, m, n, p):
    """diag and untrimmed project the task sum once (the torch backend), the others each task:
    float32 within twice the float32 reference's error of the float64 answer. The threshold is
    so wide that nothing is trimmed: a float32 mask may keep or drop an entry that sits on it."""
    B, T = 2, 3
    tau = randn(B, T, m, n, seed=11)
    Ustar, Vstar = ops.polar(randn(B, m, p, seed=12)), ops.polar(randn(B, p, n, seed=13))
    options = dict(variant=variant, trim_multiplier=1e9)
    got = ops.project_and_mask(tau.float(), Ustar.float(), Vstar.float(), backend="torch", **options)
    for b in range(B):
        answer = ref.project_and_mask(tau[b], Ustar[b], Vstar[b], **options)
        plain = ref.project_and_mask(tau[b].float(), Ustar[b].float(), Vstar[b].float(), **options)
        assert rel_err(got[b], answer) <= 2 * rel_err(plain, answer), b


@pytest.mark.parametrize("variant, tasks_seen", [("full", 3), ("offdiag", 3), ("diag", 1),
                                                 ("untrimmed", 1)])
def test_diag_and_untrimmed_reach_the_backend_as_the_task_sum(variant, tasks_seen, monkeypatch):
    """ops.project_and_mask, not each backend, sums the tasks for the variants that read only
    their sum: the backend gets tau [B, 1, m, n], the sum itself."""
    seen = []
    real = projection_batched.project_and_mask

    def spy(tau, *args):
        seen.append(tau.clone())
        return real(tau, *args)
    monkeypatch.setattr(projection_batched, "project_and_mask", spy)
    tau = randn(2, 3, 9, 7, seed=4)
    Ustar, Vstar = ops.polar(randn(2, 9, 5, seed=5)), ops.polar(randn(2, 5, 7, seed=6))
    ops.project_and_mask(tau, Ustar, Vstar, variant=variant, backend="torch")
    assert seen[0].shape[1] == tasks_seen
    if tasks_seen == 1:
        assert torch.equal(seen[0][:, 0], tau.sum(dim=1))


def test_reconstruct_with_base_alpha_and_cast():
    Ustar, S, Vstar = randn(2, 9, 4), randn(2, 4, 4, seed=1), randn(2, 4, 7, seed=2)
    base = randn(2, 9, 7, seed=3).to(torch.bfloat16)
    out = ops.reconstruct(Ustar, S, Vstar, base=base, alpha=0.5, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    want = ref.reconstruct(Ustar[1], S[1], Vstar[1], base=base[1], alpha=0.5, out_dtype=torch.bfloat16)
    assert torch.equal(out[1], want)


@pytest.mark.parametrize("m, p, q, n", [(53, 11, 13, 9), (9, 11, 13, 53), (12, 12, 12, 12)])
def test_reconstruct_in_either_order_equals_the_reference(m, p, q, n):
    """The torch backend multiplies Ustar (S Vstar) for tall Ustar, (Ustar S) Vstar otherwise:
    float64 equal to the reference's, float32 within twice its float32 error."""
    U, S, V = randn(2, m, p, seed=7), randn(2, p, q, seed=8), randn(2, q, n, seed=9)
    got = ops.reconstruct(U, S, V, backend="torch")
    got32 = ops.reconstruct(U.float(), S.float(), V.float(), backend="torch")
    for b in range(2):
        answer = ref.reconstruct(U[b], S[b], V[b])
        assert rel_err(got[b], answer) < 1e-14
        err32 = rel_err(ref.reconstruct(U[b].float(), S[b].float(), V[b].float()), answer)
        assert rel_err(got32[b], answer) <= 2 * err32 + 1e-7


@pytest.mark.parametrize("B, m, p, n", [(2, 17, 11, 9), (1, 5, 1, 13), (3, 8, 8, 8)])
def test_reconstruct_with_a_diagonal_s(B, m, p, n):
    """S given as its diagonal [B, p] is the same product as the full [B, p, p] (the zeros add
    nothing, exactly); float32 within twice the float32 reference's error of the answer."""
    U, s, V = randn(B, m, p, seed=4), randn(B, p, seed=5), randn(B, p, n, seed=6)
    answer = ops.reconstruct(U, s.diag_embed(), V, backend="torch")
    assert rel_err(ops.reconstruct(U, s, V, backend="torch"), answer) < 1e-15
    for b in range(B):
        assert rel_err(ref.reconstruct(U[b], s[b], V[b]), answer[b]) < 1e-15
    got32 = ops.reconstruct(U.float(), s.float(), V.float(), backend="torch")
    ref32 = torch.stack([ref.reconstruct(U[b].float(), s[b].float(), V[b].float())
                         for b in range(B)])
    assert got32.dtype == torch.float32
    assert rel_err(got32, answer) <= 2 * rel_err(ref32, answer) + 1e-7
    with pytest.raises(ValueError, match="shapes do not chain"):
        ops.reconstruct(U, randn(B, p + 1), V)


def test_bad_shapes_and_backends_are_named():
    with pytest.raises(ValueError, match=r"k must be in 1\.\.min\(m, n\) = 6"):
        ops.truncated_svd(randn(2, 9, 6), 7)
    with pytest.raises(ValueError, match="shapes do not fit"):
        ops.project_and_mask(randn(1, 2, 9, 6), randn(1, 9, 3), randn(1, 4, 6))
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.polar(torch.ones(2, 3, 3, dtype=torch.int64))
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run polar on cpu"):
        ops.polar(randn(1, 4, 3), backend="cuda")
    with pytest.raises(ValueError, match="precision must be None or one of"):
        ops.reconstruct(randn(1, 4, 3), randn(1, 3, 3), randn(1, 3, 5), precision="bf16")
