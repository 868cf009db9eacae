"""SCORE and TSV-M, batched over same-shape keys: shared basis from per-task truncated SVDs."""
import torch

from .. import ops, ref
from .registry import Option, merge_method

SCORE_PAPER = "SCORE: Subspace COnflict-Resolving mErging, CVPR 2026"
TSV_PAPER = "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025"


def shared_basis(tau, backend):
    """SCORE's steps 1-3 (docs/algorithms.md) for tau [B, T, m, n], k = min(m, n) // T.

    Returns Ustar [B, m, Tk], the concatenated singular values [B, Tk], Vstar [B, Tk, n].
    """
    B, T, m, n = tau.shape
    k = min(m, n) // T
    U, s, Vh = ops.truncated_svd(tau, k, backend=backend)
    Ucat = U.permute(0, 2, 1, 3).reshape(B, m, T * k)   # [U_1 ... U_T]
    Vcat = Vh.reshape(B, T * k, n)                       # [Vh_1; ...; Vh_T]
    return ops.polar(Ucat, backend=backend), s.reshape(B, T * k), ops.polar(Vcat, backend=backend)


@merge_method(
    "score", kind="matrix", paper=SCORE_PAPER, reference=ref.methods.score,
    summary="shared orthogonal basis from the tasks' top singular vectors; each task projected "
            "into it, outlying off-diagonal (conflict) entries masked, summed, reconstructed",
    options=[
        Option("variant", "full", "full | diag | offdiag | untrimmed: which parts of the "
               "projected task matrices are summed", choices=("full", "diag", "offdiag", "untrimmed")),
        Option("trim_multiplier", 1.96, "c: keep an off-diagonal entry within c * sd (/ T) of "
               "the mean", low=0.0),
        Option("trim_per_task", True, "divide the threshold by T (the authors drop this for "
               "their two medical datasets)"),
    ])
def score(tau, *, variant="full", trim_multiplier=1.96, trim_per_task=True, backend="auto"):
    Ustar, _, Vstar = shared_basis(tau, backend)
    S = ops.project_and_mask(tau, Ustar, Vstar, variant=variant, trim_multiplier=trim_multiplier,
                             trim_per_task=trim_per_task, backend=backend)
    if variant == "diag":       # S is diagonal: reconstructed from [B, p], with no p x p product
        S = torch.diagonal(S, dim1=-2, dim2=-1).contiguous()
    return ops.reconstruct(Ustar, S, Vstar, backend=backend)


@merge_method(
    "tsv", kind="matrix", paper=TSV_PAPER, reference=ref.methods.tsv,
    summary="TSV-M: the shared basis of SCORE with each task's own top-k singular values")
def tsv(tau, *, backend="auto"):
    Ustar, scat, Vstar = shared_basis(tau, backend)
    return ops.reconstruct(Ustar, scat, Vstar, backend=backend)
