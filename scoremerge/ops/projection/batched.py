"""SCORE's masked projection and the reconstruction for a batch of same-shape keys, in torch."""
import torch

from ..cpu_matmul import matmul


def project(tau, Ustar, Vstar):
    """M [B, T, p, p] = Ustar^T tau_t Vstar^T, multiplied in the cheaper order."""
    Ut, Vt = Ustar.mT.unsqueeze(1), Vstar.mT.unsqueeze(1)
    m, n = tau.shape[-2:]
    return matmul(matmul(Ut, tau), Vt) if n <= m else matmul(Ut, matmul(tau, Vt))


def project_diagonal(A, Ustar, Vstar):
    """diag(Ustar^T A Vstar^T) [B, p] for A [B, m, n], without the second p-wide product: row
    i of Ustar^T A dotted with row i of Vstar (or column i of A Vstar^T with column i of Ustar,
    the cheaper order)."""
    m, n = A.shape[-2:]
    if n <= m:
        return matmul(Ustar.mT, A).mul_(Vstar).sum(dim=-1)
    return matmul(A, Vstar.mT).mul_(Ustar).sum(dim=-2)


def project_and_mask(tau, Ustar, Vstar, variant, trim_multiplier, trim_per_task):
    """S [B, p, p] summed over tasks; see ops.project_and_mask."""
    T = tau.shape[1]
    if variant in ("untrimmed", "diag"):
        # ops.project_and_mask hands these the task sum (T = 1); diag then needs the diagonal
        # alone, 2mnp flops where the whole projection takes 2mnp + 2p^2 n
        A = tau[:, 0] if T == 1 else tau.sum(dim=1)
        if variant == "untrimmed":
            return project(A[:, None], Ustar, Vstar)[:, 0]
        return torch.diag_embed(project_diagonal(A, Ustar, Vstar))
    M = project(tau, Ustar, Vstar)
    diag = torch.diagonal(M, dim1=-2, dim2=-1).sum(dim=1)
    p = M.shape[-1]
    if p == 1:
        return torch.diag_embed(diag if variant != "offdiag" else torch.zeros_like(diag))
    O = M                                             # M is ours: its diagonal is zeroed in place
    torch.diagonal(O, dim1=-2, dim2=-1).zero_()
    D = O - O.mean(dim=(-2, -1), keepdim=True)
    # the Bessel-corrected sd from the deviations, accumulated in float64: torch's std took
    # 12 ms of the 24 here (T = 4, p = 768), and a float32 norm lost 7e-6 of it
    sd = (torch.linalg.vector_norm(D, dim=(-2, -1), keepdim=True, dtype=torch.float64)
          / (p * p - 1) ** 0.5).to(O.dtype)
    threshold = trim_multiplier * sd / T if trim_per_task else trim_multiplier * sd
    kept = O.masked_fill_(D.abs_() > threshold, 0.0).sum(dim=1)
    if variant != "offdiag":
        torch.diagonal(kept, dim1=-2, dim2=-1).add_(diag)
    return kept


def reconstruct(Ustar, S, Vstar, base, alpha, out_dtype):
    """See ops.reconstruct; S [B, p, q], or its diagonal [B, p]."""
    if S.ndim == 2:
        out = matmul(Ustar * S[:, None, :], Vstar)
    else:
        # (Ustar S) Vstar costs m p q + m q n, Ustar (S Vstar) p q n + m p n: SCORE's tall keys
        # (m = 4p) take the second at 0.6x the work
        (m, p), (q, n) = Ustar.shape[-2:], Vstar.shape[-2:]
        cheaper_left = m * q * (p + n) <= n * p * (q + m)
        out = matmul(matmul(Ustar, S), Vstar) if cheaper_left else matmul(Ustar, matmul(S, Vstar))
    if base is not None:
        out = torch.add(base.to(out.dtype), out, alpha=alpha)
    return out.to(out_dtype)
