"""ops.truncated_svd and ops.polar: the top-k singular triplets and the orthogonal polar factor of
a batch of matrices.

naive.py: the reference (torch.linalg.svd). batched.py: the torch backend, which routes between
gram64.py (float64 Gram matrices and a symmetric eigensolver) and cpu_float32.py (float32 on a
CPU). cuda.py: the float64 Gram route with cuSOLVER's batched eigensolver. gram.py: the Gram
products X^T X both routes take. signs.py: the sign convention all of them share.
"""
from ...backend import run
from ..checks import check_matrix_batch
from . import batched, cuda
from .signs import canonical_signs


def truncated_svd(A, k, *, backend="auto"):
    """Top-k singular triplets of A [..., m, n], batched over the leading dims.

    Returns U [..., m, k], S [..., k] (descending), Vh [..., k, n], with docs/algorithms.md's
    sign convention (the largest-magnitude entry of each u_i is positive). float32 or float64.
    Backends: torch (float32 on a CPU: a float32 Gram eigensolver refined by float32 products
    and a small float64 Rayleigh-Ritz problem, cpu_float32.py; otherwise float64 Gram
    matrices and torch's eigensolver; items outside either route's guards are redone the float64
    way or by SVD) and cuda (the float64 Gram route with cuSOLVER's batched eigensolver: one call
    per batch).

    >>> U, S, Vh = truncated_svd(torch.randn(4, 30, 20), 5)
    """
    check_matrix_batch("A", A, ndim=2)
    r = min(A.shape[-2:])
    if not 1 <= k <= r:
        raise ValueError(f"k must be in 1..min(m, n) = {r}, got {k} for A of shape {tuple(A.shape)}")
    lead = A.shape[:-2]
    flat = A.reshape(-1, *A.shape[-2:])
    U, S, Vh = run("truncated_svd", backend, A.device,
                   {"cuda": lambda: cuda.truncated_svd(flat, k),
                    "torch": lambda: batched.truncated_svd(flat, k)})
    U, Vh = canonical_signs(U, Vh)
    return U.reshape(*lead, *U.shape[-2:]), S.reshape(*lead, k), Vh.reshape(*lead, *Vh.shape[-2:])


def polar(A, *, backend="auto"):
    """Orthogonal polar factor of A [..., m, n] -> [..., m, n]: with the thin SVD A = P S Q, P Q,
    the orthonormal matrix nearest A. float32 or float64. Backends as ops.truncated_svd's (float32
    on a CPU: X (X^T X)^(-1/2) from a float32 eigensolver where kappa(A) <= 16, float32 SVD
    otherwise).

    >>> Q = polar(torch.randn(4, 30, 20))   # Q.mT @ Q == I
    """
    check_matrix_batch("A", A, ndim=2)
    flat = A.reshape(-1, *A.shape[-2:])
    out = run("polar", backend, A.device, {"cuda": lambda: cuda.polar(flat),
                                           "torch": lambda: batched.polar(flat)})
    return out.reshape(A.shape)
