"""The references of truncated_svd and polar: plain torch.linalg.svd, literal, the ground truth
for the tests and benchmarks (scoremerge.ref.linalg).

Every function accepts a batch of matrices [..., m, n] and computes in the dtype it is given.
"""
import torch

from .signs import canonical_signs


def truncated_svd(A, k):
    """Top-k singular triplets of A [..., m, n], values descending, canonical signs.

    Returns U [..., m, k], S [..., k], Vh [..., k, n].
    """
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    U, Vh = canonical_signs(U[..., :k], Vh[..., :k, :])
    return U, S[..., :k], Vh


def polar(A):
    """Orthogonal polar factor P Q of A = P diag(sigma) Q (thin SVD), [..., m, n] -> [..., m, n]."""
    P, _, Q = torch.linalg.svd(A, full_matrices=False)
    return P @ Q
