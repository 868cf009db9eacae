"""ops.polar: the orthogonal polar factor of a batch of matrices."""
from ..backend import run
from ..kernels import cuda_linalg
from ..kernels.torch import linalg as torch_linalg
from ._checks import check_matrix_batch


def polar(A, *, backend="auto"):
    """Orthogonal polar factor of A [..., m, n] -> [..., m, n]: with the thin SVD A = P S Q, P Q,
    the orthonormal matrix nearest A. float32 or float64. Backends as ops.truncated_svd's (float32
    on a CPU: X (X^T X)^(-1/2) from a float32 eigensolver where kappa(A) <= 16, float32 SVD
    otherwise).

    >>> Q = polar(torch.randn(4, 30, 20))   # Q.mT @ Q == I
    """
    check_matrix_batch("A", A, ndim=2)
    flat = A.reshape(-1, *A.shape[-2:])
    out = run("polar", backend, A.device, {"cuda": lambda: cuda_linalg.polar(flat),
                                           "torch": lambda: torch_linalg.polar(flat)})
    return out.reshape(A.shape)
