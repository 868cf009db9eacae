"""The CUDA truncated SVD and polar factor without a GPU: the extension's eigensolver bindings check
their arguments on the host; ops/linalg/cuda.py reads cuSOLVER's column-major output right
(checked against a stand-in that honours cusolverDnXsyevBatched's contract through raw pointers);
items the solver does not converge on are redone; the Gram route with any eigensolver matches
the reference. The GPU runs are tests/test_linalg_gpu.py."""
import ctypes

import numpy as np
import pytest
import torch

from scoremerge import BackendUnavailableError, ops, ref
from scoremerge.backend import cuda
from scoremerge.ops.linalg import cuda as cuda_linalg
from scoremerge.ops.linalg import gram64 as gram_route

from test_cuda_extension import needs_nvcc


class EmulatedSolver:
    """cusolverDnXsyevBatched's contract, on the CPU, through the same raw pointers: each n x n
    matrix is read column-major from its lower triangle, overwritten by its eigenvectors as
    columns (column-major), eigenvalues ascending; matrices for which `fails(matrix)` holds are
    reported as not converged (info != 0; their outputs are garbage)."""

    def __init__(self, fails=lambda matrix: False):
        self.fails = fails
        self.calls = 0

    def eigh_workspace(self, dtype, n, batch):
        return 64, 0

    def eigh_batched(self, dtype, n, batch, a, w, info, work, work_bytes, stream):
        assert work_bytes >= 64 and stream == 0
        self.calls += 1
        ctype = ctypes.c_double if dtype == "float64" else ctypes.c_float
        buf = np.ctypeslib.as_array((ctype * (batch * n * n)).from_address(a)).reshape(batch, n, n)
        values = np.ctypeslib.as_array((ctype * (batch * n)).from_address(w)).reshape(batch, n)
        flags = np.ctypeslib.as_array((ctypes.c_int32 * batch).from_address(info))
        failed = []
        for k in range(batch):
            column_major = buf[k].T                       # M[i, j] lives at i + n * j
            lower = np.tril(column_major) + np.tril(column_major, -1).T
            vals, vecs = np.linalg.eigh(lower)
            buf[k] = vecs.T                               # column j of M = eigenvector j
            values[k] = vals
            flags[k] = 0
            if self.fails(lower):
                flags[k], buf[k] = 1, 7.0
                failed.append(k)
        return failed


@pytest.fixture
def emulated(monkeypatch):
    solver = EmulatedSolver()
    monkeypatch.setattr(cuda, "extension", lambda: (solver, None))
    return solver


def random_gram(b, n, seed):
    X = torch.randn(b, n + 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return X.mT @ X


def test_eigh_reads_the_column_major_eigenvectors(emulated):
    G = random_gram(4, 9, seed=0)
    # The solver reads the column-major lower triangle: the row-major upper one. A stray lower
    # triangle (an asymmetric Gram product) must not matter.
    G[1] = G[1] + torch.tril(torch.ones(9, 9, dtype=torch.float64), -1)
    sym = torch.triu(G) + torch.triu(G, 1).mT
    w, Q = cuda_linalg.eigh(G)
    w_ref, _ = torch.linalg.eigh(sym)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(Q @ torch.diag_embed(w) @ Q.mT, sym, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(Q.mT @ Q, torch.eye(9, dtype=torch.float64).expand(4, 9, 9),
                               rtol=0, atol=1e-12)
    assert emulated.calls == 1                            # one call for the whole batch


def test_items_the_solver_does_not_converge_on_are_redone(monkeypatch):
    # items 0 and 2 are scaled up; the stand-in "fails" on any Gram matrix that large
    solver = EmulatedSolver(fails=lambda G: np.trace(G) > 1e4)
    monkeypatch.setattr(cuda, "extension", lambda: (solver, None))
    A = torch.randn(3, 40, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A[[0, 2]] *= 10
    w, _ = cuda_linalg.eigh(A.mT @ A)
    assert w[[0, 2]].isnan().all() and not w[1].isnan().any()
    U, S, Vh = cuda_linalg.truncated_svd(A, 5)
    _, S_ref, _ = ref.truncated_svd(A, 5)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(cuda_linalg.polar(A), ref.polar(A), rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape, k", [((5, 37, 23), 6), ((3, 23, 37), 23), ((2, 64, 64), 1)])
def test_the_cuda_route_equals_the_reference(emulated, shape, k):
    A = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    U, S, Vh = cuda_linalg.truncated_svd(A, k)
    U, Vh = ref.canonical_signs(U, Vh)
    Ur, Sr, Vhr = ref.truncated_svd(A, k)
    for got, want in ((U, Ur), (S, Sr), (Vh, Vhr)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
    torch.testing.assert_close(cuda_linalg.polar(A), ref.polar(A), rtol=0, atol=1e-9)


def test_the_gram_route_takes_any_eigensolver():
    calls = []

    def counting_eigh(G):
        calls.append(G.shape)
        return torch.linalg.eigh(G)

    A = torch.randn(4, 30, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    _, S, _ = gram_route.truncated_svd(A, 4, eigh=counting_eigh)
    torch.testing.assert_close(S, ref.truncated_svd(A, 4)[1], rtol=1e-10, atol=0)
    torch.testing.assert_close(gram_route.polar(A, eigh=counting_eigh), ref.polar(A),
                               rtol=0, atol=1e-10)
    assert calls and all(shape[-1] == 12 for shape in calls)


def test_cuda_backend_named_on_a_cpu_tensor_says_why():
    A = torch.randn(2, 5, 4)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run truncated_svd"):
        ops.truncated_svd(A, 2, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run polar"):
        ops.polar(A, backend="cuda")


@needs_nvcc
def test_the_eigensolver_bindings_check_their_arguments_on_the_host():
    from scoremerge import _C
    ok = dict(dtype="float64", n=3, batch=2, a=64, w=64, info=64, work=64, work_bytes=64,
              stream=0)
    for change, message in [({"dtype": "float16"}, "float64 or float32"),
                            ({"n": 0}, "n must be >= 1"), ({"batch": 0}, "batch must be >= 1"),
                            ({"n": 50_000}, "batched limit"), ({"a": 0}, "a is null"),
                            ({"w": 68}, "w is not aligned to 8"),
                            ({"info": 66}, "info is not aligned to 4"),
                            ({"work_bytes": -1}, "work_bytes must be >= 0"),
                            ({"work": 0}, "work is null")]:
        with pytest.raises(ValueError, match=message):
            _C.eigh_batched(**{**ok, **change})
    with pytest.raises(ValueError, match="float64 or float32"):
        _C.eigh_workspace("int8", 3, 2)
    assert isinstance(_C.eigh_error(), str)
