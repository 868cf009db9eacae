"""Dense references for the factored ops and methods: materialize B @ A and call scoremerge.ref.

The ground truth of the LoRA tests and the "dense" side of the LoRA benchmark: every m x n task
matrix formed, every decomposition a torch.linalg.svd of it, with the same low-rank convention
as scoremerge.lora.methods (see there); ref's own functions wherever the convention leaves the
dense definition unchanged.
"""
import torch

from .. import ref
from ..ref.methods import iso_cts_sizes
from .factored import numerical_rank


def svd(update, k=None):
    """factored.svd by a dense SVD of the materialized update."""
    tau = update.materialize()
    return ref.truncated_svd(tau, min(tau.shape[-2:]) if k is None else k)


def project(U, update, Vh):
    """factored.project as U^T (s B A) Vh^T with the m x n product formed."""
    return U.mT @ update.materialize(U.dtype) @ Vh.mT


def concat(updates):
    """factored.concat materialized: the dense sum."""
    return sum(u.materialize() for u in updates)


def _rank(tau):
    return int(numerical_rank(torch.linalg.svdvals(tau), *tau.shape))


def _top(tau, k):
    """(U, S, Vh) of tau's top min(k, rank) triplets, or None: one full SVD, cut after the
    signs are set (they are set per triplet, so cutting first or after is the same)."""
    U, S, Vh = ref.truncated_svd(tau, min(tau.shape))
    kept = min(k, int(numerical_rank(S, *tau.shape)))
    return (U[:, :kept], S[:kept], Vh[:kept]) if kept else None


def score(taus, *, variant="full", trim_multiplier=1.96, trim_per_task=True):
    """SCORE on dense task matrices [m, n] (zeros for an absent expert) with the convention."""
    basis = _shared_basis(taus)
    if basis is None:
        return torch.zeros_like(taus[0])
    Ustar, _, Vstar = basis
    S = ref.project_and_mask(torch.stack(taus), Ustar, Vstar, variant=variant,
                             trim_multiplier=trim_multiplier, trim_per_task=trim_per_task)
    return ref.reconstruct(Ustar, S, Vstar)


def tsv(taus):
    basis = _shared_basis(taus)
    if basis is None:
        return torch.zeros_like(taus[0])
    Ustar, scat, Vstar = basis
    return Ustar @ torch.diag(scat) @ Vstar


def _shared_basis(taus):
    k = min(taus[0].shape) // len(taus)
    tops = [t for t in (_top(tau, k) for tau in taus) if t is not None]
    if not tops:
        return None
    Us, Ss, Vhs = zip(*tops)
    return ref.polar(torch.cat(Us, dim=1)), torch.cat(Ss), ref.polar(torch.cat(Vhs, dim=0))


def iso_c(taus):
    total = sum(taus)
    rho = _rank(total)
    if rho == 0:
        return torch.zeros_like(total)
    U, s, Vh = torch.linalg.svd(total, full_matrices=False)
    return s[:rho].mean() * (U[:, :rho] @ Vh[:rho])


def iso_cts(taus, *, common_space_fraction=0.8):
    total = sum(taus)
    rho = _rank(total)
    if rho == 0:
        return torch.zeros_like(total)
    c, n_t = iso_cts_sizes(rho, len(taus), common_space_fraction)
    U, s, Vh = torch.linalg.svd(total, full_matrices=False)
    Uc, sc, Vhc = U[:, :c], s[:c], Vh[:c]
    blocks = [b for b in (_top(tau - Uc @ (Uc.mT @ tau), n_t) for tau in taus) if b is not None]
    blocks.append((Uc, sc, Vhc))
    Ucat = torch.cat([b[0] for b in blocks], dim=1)
    scat = torch.cat([b[1] for b in blocks])
    Vcat = torch.cat([b[2] for b in blocks], dim=0)
    return scat.mean() * (ref.polar(Ucat) @ ref.polar(Vcat))


CONVENTION = {"score": score, "tsv": tsv, "iso_c": iso_c, "iso_cts": iso_cts}


def merge_factored(task_vectors, shapes, method, *, exclude=(), **options):
    """The dense merge of factored task vectors ({key: LowRank} per expert, a missing key a
    zero update): materialized, then scoremerge.ref.merge_task_vectors for the methods the
    convention leaves alone, and the convention's versions above for the matrix methods.
    shapes: {key: (m, n)}. Returns {key: merged dense update}."""
    dtype = next(u.B.dtype for tv in task_vectors for u in tv.values())
    dense = [{key: tv[key].materialize(dtype) if key in tv else torch.zeros(shape, dtype=dtype)
              for key, shape in shapes.items()} for tv in task_vectors]
    if method not in CONVENTION:
        return ref.merge_task_vectors(dense, method, exclude=exclude, **options)
    mean_path = ref.merge_task_vectors(dense, "mean", exclude=exclude)
    T = len(dense)
    return {key: CONVENTION[method]([tv[key] for tv in dense], **options)
            if ref.methods.routes_to_matrix(key, dense[0][key], T, exclude, method)
            else mean_path[key]
            for key in shapes}
