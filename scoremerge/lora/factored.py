"""Low-rank updates held as factors, and the ops on them that never form an m x n matrix.

A LoRA expert's update of one weight is `scaling * B @ A` (B [m, r], A [r, n], r << m, n). The
ops here work on the factors: a truncated SVD from two thin QRs and the SVD of an r x r core
(O((m + n) r^2 + r^3) instead of the O(m n min(m, n)) of a dense SVD), a projection onto a pair
of bases as (U^T B)(A Vh^T), and a sum as one factored update of the summed rank. Every op takes
a batch of same-shape items ([..., m, r]); scoremerge.lora.reference is the dense version of
each, built on scoremerge.ref.
"""
from dataclasses import dataclass

import torch

from ..ops.linalg.signs import canonical_signs


@dataclass(frozen=True)
class LowRank:
    """The update `scaling * B @ A`: B [..., m, r], A [..., r, n], leading dims a batch of keys.
    r may be 0 (no update)."""
    B: torch.Tensor
    A: torch.Tensor
    scaling: float = 1.0

    def __post_init__(self):
        B, A = self.B, self.A
        if B.ndim < 2 or A.ndim != B.ndim or B.shape[:-2] != A.shape[:-2] \
                or B.shape[-1] != A.shape[-2]:
            raise ValueError(f"LowRank needs B [..., m, r] and A [..., r, n] with the same r "
                             f"and batch dims; got B {tuple(B.shape)}, A {tuple(A.shape)}")

    @property
    def shape(self):
        """The update's shape [..., m, n]."""
        return (*self.B.shape[:-1], self.A.shape[-1])

    @property
    def rank(self):
        return self.B.shape[-1]

    def factors(self, dtype=None):
        """(scaling * B, A) in `dtype` (default: B's): the scaling folded into B."""
        dtype = dtype or self.B.dtype
        return self.B.to(dtype) * self.scaling, self.A.to(dtype)

    def materialize(self, dtype=None):
        """The dense update [..., m, n]: for the final reconstruction and for references."""
        B, A = self.factors(dtype)
        return B @ A


def concat(updates):
    """The sum of updates [..., m, n] (LowRank, same shape) as one LowRank of the summed rank:
    sum_t s_t B_t A_t = [s_1 B_1 ... s_T B_T] [A_1; ...; A_T]."""
    parts = [u.factors(updates[0].B.dtype) for u in updates]
    return LowRank(torch.cat([B for B, _ in parts], dim=-1),
                   torch.cat([A for _, A in parts], dim=-2))


def svd(update, k=None):
    """The top-k singular triplets of update = s B A [..., m, n], from its factors.

    B = Qb Rb and A^T = Qa Ra (thin QRs), so s B A = Qb (s Rb Ra^T) Qa^T, and the SVD of that
    small core Uc S Vch gives U = Qb Uc, Vh = Vch Qa^T. k defaults to every triplet the core
    has (min(m, n, r)). Returns U [..., m, k], S [..., k] descending, Vh [..., k, n] with
    docs/algorithms.md's sign convention, in the factors' dtype.

    >>> U, S, Vh = svd(LowRank(torch.randn(300, 16), torch.randn(16, 200)), k=8)
    """
    B, A = update.factors()
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    k = S.shape[-1] if k is None else k
    if not 0 <= k <= S.shape[-1]:
        raise ValueError(f"k must be in 0..{S.shape[-1]} for an update of shape "
                         f"{tuple(update.shape)} and rank {update.rank}, got {k}")
    U, Vh = Qb @ Uc[..., :k], Vch[..., :k, :] @ Qa.mT
    U, Vh = canonical_signs(U, Vh)
    return U, S[..., :k], Vh


def project(U, update, Vh):
    """U^T (s B A) Vh^T as (U^T s B)(A Vh^T): U [..., m, p], Vh [..., q, n] -> [..., p, q]."""
    B, A = update.factors(U.dtype)
    return (U.mT @ B) @ (A @ Vh.mT)


def numerical_rank(S, m, n):
    """How many of the descending singular values S [..., k] count as non-zero: above
    max(m, n) * eps * S[0], the rule of numpy's and torch's matrix_rank. [...] int64."""
    if S.shape[-1] == 0:
        return torch.zeros(S.shape[:-1], dtype=torch.int64)
    tol = max(m, n) * torch.finfo(S.dtype).eps * S[..., :1]
    return ((S > tol) & (S > 0)).sum(dim=-1)


def truncate(update, rank):
    """(the best rank-`rank` approximation of update, as LowRank(U S, Vh), and the relative
    Frobenius error of dropping the rest, [...] from the singular values: exact, no m x n)."""
    U, S, Vh = svd(update)
    kept = min(rank, S.shape[-1])
    total = S.square().sum(dim=-1)
    dropped = S[..., kept:].square().sum(dim=-1)
    error = torch.where(total > 0, (dropped / total.clamp_min(torch.finfo(S.dtype).tiny)).sqrt(),
                        torch.zeros_like(total))
    return LowRank(U[..., :kept] * S[..., None, :kept], Vh[..., :kept, :]), error
