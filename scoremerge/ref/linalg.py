"""Plain torch.linalg decompositions: the ground truth for ops.truncated_svd and ops.polar.

Every function accepts a batch of matrices [..., m, n] and computes in the dtype it is given.
"""
import torch


def canonical_signs(U, Vh):
    """Flip each singular pair so the largest-magnitude entry of u_i is positive.

    U: [..., m, k], Vh: [..., k, n]. Ties go to the first such entry (argmax returns the first).
    This is ALGORITHMS.md's sign convention; it makes SCORE's full/offdiag variants reproducible.
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)  # [..., 1, k]
    sign = torch.gather(U, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, Vh * sign.mT


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
