"""ops.truncated_svd: the top-k singular triplets of a batch of matrices."""
from ..backend import run
from ..kernels import cuda_linalg
from ..kernels.torch import linalg as torch_linalg
from ..ref.linalg import canonical_signs
from ._checks import check_matrix_batch


def truncated_svd(A, k, *, backend="auto"):
    """Top-k singular triplets of A [..., m, n], batched over the leading dims.

    Returns U [..., m, k], S [..., k] (descending), Vh [..., k, n], with ALGORITHMS.md's sign
    convention (the largest-magnitude entry of each u_i is positive). float32 or float64.
    Backends: torch (float32 on a CPU: a float32 Gram eigensolver refined by float32 products
    and a small float64 Rayleigh-Ritz problem, kernels/torch/mixed.py; otherwise float64 Gram
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
                   {"cuda": lambda: cuda_linalg.truncated_svd(flat, k),
                    "torch": lambda: torch_linalg.truncated_svd(flat, k)})
    U, Vh = canonical_signs(U, Vh)
    return U.reshape(*lead, *U.shape[-2:]), S.reshape(*lead, k), Vh.reshape(*lead, *Vh.shape[-2:])
