"""Plain-torch references for SCORE's masked projection and the reconstruction
(docs/algorithms.md, steps 4-7), written one key and one task at a time."""
import torch


def mask_off_diagonal(M, T, trim_multiplier=1.96, trim_per_task=True):
    """Kept off-diagonal part of one projected task matrix M [p, p] (step 5).

    Mean and Bessel-corrected standard deviation run over all p*p entries of M with its diagonal
    zeroed (the zeros included); entries farther than c * sd (/ T) from the mean are dropped.
    """
    p = M.shape[-1]
    O = M - torch.diag(torch.diagonal(M))
    if p == 1:  # no off-diagonal entries, and sd of one value is undefined
        return O
    mu = O.mean()
    sd = O.std(correction=1)
    threshold = trim_multiplier * sd / T if trim_per_task else trim_multiplier * sd
    return torch.where((O - mu).abs() <= threshold, O, torch.zeros_like(O))


def project_and_mask(tau, Ustar, Vstar, *, variant="full", trim_multiplier=1.96, trim_per_task=True):
    """S = sum_t (masked Ustar^T tau_t Vstar^T) for one key.

    tau: [T, m, n] task matrices, Ustar: [m, p], Vstar: [p, n] -> S: [p, p].
    """
    T = tau.shape[0]
    S = torch.zeros(Ustar.shape[1], Vstar.shape[0], dtype=tau.dtype, device=tau.device)
    for t in range(T):
        M = Ustar.mT @ tau[t] @ Vstar.mT
        diag = torch.diag(torch.diagonal(M))
        if variant == "untrimmed":
            S += M
        elif variant == "diag":
            S += diag
        else:
            kept = mask_off_diagonal(M, T, trim_multiplier, trim_per_task)
            S += kept if variant == "offdiag" else diag + kept
    return S


def reconstruct(Ustar, S, Vstar, *, base=None, alpha=1.0, out_dtype=None):
    """Ustar S Vstar, or base + alpha * Ustar S Vstar, cast to out_dtype (default: S's dtype).
    S [p, q], or a diagonal given as [p]."""
    out = Ustar @ (torch.diag(S) if S.ndim == 1 else S) @ Vstar
    if base is not None:
        out = base.to(out.dtype) + alpha * out
    return out.to(out_dtype or S.dtype)
