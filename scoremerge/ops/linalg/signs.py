"""The sign convention of singular pairs (docs/algorithms.md), shared by the fast paths and the
reference: a convention, not an algorithm, so it is written once."""
import torch


def canonical_signs(U, Vh):
    """Flip each singular pair so the largest-magnitude entry of u_i is positive.

    U: [..., m, k], Vh: [..., k, n]. Ties go to the first such entry (argmax returns the first).
    It makes SCORE's full and offdiag variants, the sign-dependent ones, reproducible.
    """
    idx = U.abs().argmax(dim=-2, keepdim=True)  # [..., 1, k]
    sign = torch.gather(U, -2, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U * sign, Vh * sign.mT
