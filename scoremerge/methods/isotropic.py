"""Iso-C and Iso-CTS, batched over same-shape keys: flat spectra over common (and task) spaces."""
import torch

from .. import ops, ref
from ..ops.cpu_matmul import matmul
from .registry import Option, merge_method

ISO_PAPER = "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and " \
            "Task-Specific Subspaces, ICML 2025"


@merge_method("iso_c", kind="matrix", paper=ISO_PAPER, reference=ref.methods.iso_c,
              summary="Iso-C: the summed task matrix with every singular value set to their mean",
              on_task_sum=True)
def iso_c(tau, *, backend="auto"):
    # mean(s) U Vh is mean(s) polar(A), and mean(s) = trace(P^T A) / r (P^T A = V diag(s) V^T):
    # one polar factor, with no singular vectors to reconstruct from
    A = tau.sum(dim=1)
    P = ops.polar(A, backend=backend)
    return P * ((P * A).sum(dim=(-2, -1)) / min(A.shape[-2:]))[:, None, None]


@merge_method(
    "iso_cts", kind="matrix", paper=ISO_PAPER, reference=ref.methods.iso_cts,
    summary="Iso-CTS: common space of the summed task matrix plus each task's own residual "
            "directions, orthogonalised, with a flat spectrum",
    options=[Option("common_space_fraction", 0.8, "share of the rank given to the common space",
                    low=0.0, high=1.0)])
def iso_cts(tau, *, common_space_fraction=0.8, backend="auto"):
    B, T, m, n = tau.shape
    c, n_t = ref.methods.iso_cts_sizes(min(m, n), T, common_space_fraction)
    Us, ss, Vhs = [], [], []                     # task blocks first, the common block last
    common = ops.truncated_svd(tau.sum(dim=1), c, backend=backend) if c else None
    if n_t:
        if common is None:
            residual = tau
        else:
            Uc = common[0][:, None]
            residual = tau - matmul(Uc, matmul(Uc.mT, tau))
        U, s, Vh = ops.truncated_svd(residual, n_t, backend=backend)
        Us.append(U.permute(0, 2, 1, 3).reshape(B, m, T * n_t))
        ss.append(s.reshape(B, T * n_t))
        Vhs.append(Vh.reshape(B, T * n_t, n))
    if common is not None:
        Us.append(common[0]), ss.append(common[1]), Vhs.append(common[2])
    return _flat_spectrum(torch.cat(Us, dim=2), torch.cat(ss, dim=1), torch.cat(Vhs, dim=1), backend)


def _flat_spectrum(U, s, Vh, backend):
    """mean(s) * polar(U) @ polar(Vh), batched."""
    Ustar, Vstar = ops.polar(U, backend=backend), ops.polar(Vh, backend=backend)
    return _scaled_product(Ustar, s.mean(dim=1), Vstar, backend)


def _scaled_product(U, scale, Vh, backend):
    """scale[b] * U[b] @ Vh[b] through ops.reconstruct, the scale a constant diagonal."""
    return ops.reconstruct(U, scale[:, None].expand(-1, U.shape[-1]), Vh, backend=backend)
