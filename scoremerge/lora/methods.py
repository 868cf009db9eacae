"""The matrix methods of docs/algorithms.md on factored updates, one key at a time.

Each function takes one key's updates, a list over the T experts of LowRank (scaling folded in,
in the compute dtype) or None where an expert does not adapt the key (a zero update), and
returns the merged update as a LowRank of rank at most the sum of the experts' ranks. No m x n
matrix is formed: every decomposition is of a factor or of a small core.

The low-rank convention. The dense definitions assume each task matrix has at least k =
min(m, n) // T non-zero singular values (SCORE, TSV-M) and that the summed matrix has min(m, n)
of them (Iso-C, Iso-CTS). A LoRA update of rank r < k has k - r singular vectors for the
singular value zero, whose completion is arbitrary (it depends on the LAPACK build) and still
moves the polar factors, and Iso-C's mean over min(m, n) values counts zeros. So, here and in
scoremerge.lora.reference alike, a "rank" is the numerical rank (factored.numerical_rank), and:
- SCORE, TSV-M: task t contributes its top k_t = min(k, rank_t) triplets (K = sum_t k_t columns
  in the shared basis, K in place of Tk in SCORE's masking statistics);
- Iso-C: the flat spectrum is the mean of the non-zero singular values of the sum, over its
  rank rho, on those rho directions only;
- Iso-CTS: the sizes c and n_t come from rho in place of min(m, n); task t's residual
  contributes min(n_t, rank of the residual) triplets.
When every update has rank >= k (and the sum full rank, for Iso) this is the dense definition.
"""
import torch

from .. import ops
from ..ref.methods import iso_cts_sizes
from .factored import LowRank, concat, numerical_rank, project, svd


def _empty(m, n, dtype):
    return LowRank(torch.zeros(m, 0, dtype=dtype), torch.zeros(0, n, dtype=dtype))


def _present(updates):
    return [u for u in updates if u is not None]


def _top(update, k, m, n):
    """(U, S, Vh) of update's top min(k, numerical rank) triplets, or None for none."""
    if update is None or k == 0 or update.rank == 0:
        return None
    U, S, Vh = svd(update, min(k, update.rank, m, n))
    kept = int(numerical_rank(S, m, n))
    return (U[:, :kept], S[:kept], Vh[:kept]) if kept else None


def shared_basis(updates, m, n, backend):
    """SCORE's steps 1-3 with the convention: (Ustar [m, K], scat [K], Vstar [K, n]), or None
    when no expert has a non-zero update here."""
    k = min(m, n) // len(updates)
    tops = [t for t in (_top(u, k, m, n) for u in updates) if t is not None]
    if not tops:
        return None
    Ucat = torch.cat([U for U, _, _ in tops], dim=1)
    Vcat = torch.cat([Vh for _, _, Vh in tops], dim=0)
    return ops.polar(Ucat, backend=backend), torch.cat([S for _, S, _ in tops]), \
        ops.polar(Vcat, backend=backend)


def score(updates, m, n, *, variant="full", trim_multiplier=1.96, trim_per_task=True,
          backend="auto"):
    """SCORE: M_t = Ustar^T tau_t Vstar^T from the factors, masked and summed by
    ops.project_and_mask run on the K x K matrices themselves (with identity bases: a product
    with I is exact), so the masking is the dense method's own code."""
    basis = shared_basis(updates, m, n, backend)
    dtype = _present(updates)[0].B.dtype
    if basis is None:
        return _empty(m, n, dtype)
    Ustar, _, Vstar = basis
    K = Ustar.shape[1]
    M = torch.stack([project(Ustar, u, Vstar) if u is not None else
                     torch.zeros(K, K, dtype=dtype) for u in updates])
    eye = torch.eye(K, dtype=dtype)[None]
    S = ops.project_and_mask(M[None], eye, eye, variant=variant, trim_multiplier=trim_multiplier,
                             trim_per_task=trim_per_task, backend=backend)[0]
    return LowRank(Ustar @ S, Vstar)


def tsv(updates, m, n, *, backend="auto"):
    """TSV-M: the shared basis with each task's own singular values."""
    basis = shared_basis(updates, m, n, backend)
    if basis is None:
        return _empty(m, n, _present(updates)[0].B.dtype)
    Ustar, scat, Vstar = basis
    return LowRank(Ustar * scat, Vstar)


def iso_c(updates, m, n, *, backend="auto"):
    """Iso-C: the sum's singular vectors (already orthonormal) at the mean non-zero value."""
    U, S, Vh = svd(concat(_present(updates)))
    rho = int(numerical_rank(S, m, n))
    if rho == 0:
        return _empty(m, n, S.dtype)
    return LowRank(U[:, :rho] * S[:rho].mean(), Vh[:rho])


def iso_cts(updates, m, n, *, common_space_fraction=0.8, backend="auto"):
    """Iso-CTS: common space of the sum, each task's residual tau_t - Uc Uc^T tau_t taken as
    the factors (B_t - Uc (Uc^T B_t), A_t), task blocks first, then polar factors and a flat
    spectrum."""
    U, S, Vh = svd(concat(_present(updates)))
    rho = int(numerical_rank(S, m, n))
    if rho == 0:
        return _empty(m, n, S.dtype)
    c, n_t = iso_cts_sizes(rho, len(updates), common_space_fraction)
    Uc, Sc, Vhc = U[:, :c], S[:c], Vh[:c]
    blocks = []
    for u in _present(updates):
        residual = LowRank(u.B - Uc @ (Uc.mT @ u.B), u.A)
        top = _top(residual, n_t, m, n)
        if top is not None:
            blocks.append(top)
    blocks.append((Uc, Sc, Vhc))
    Ucat = torch.cat([b[0] for b in blocks], dim=1)
    scat = torch.cat([b[1] for b in blocks])
    Vcat = torch.cat([b[2] for b in blocks], dim=0)
    Ustar, Vstar = ops.polar(Ucat, backend=backend), ops.polar(Vcat, backend=backend)
    return LowRank(Ustar * scat.mean(), Vstar)


def task_arithmetic(updates, m, n, *, backend="auto"):
    return concat(_present(updates))


def mean(updates, m, n, *, backend="auto"):
    total = concat(_present(updates))
    return LowRank(total.B / len(updates), total.A)


FACTORED = {"score": score, "tsv": tsv, "iso_c": iso_c, "iso_cts": iso_cts,
            "task_arithmetic": task_arithmetic, "mean": mean}
