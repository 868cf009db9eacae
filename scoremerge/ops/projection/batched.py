"""SCORE's masked projection and the reconstruction for a batch of same-shape keys, in torch."""
import torch


def project(tau, Ustar, Vstar):
    """M [B, T, p, p] = Ustar^T tau_t Vstar^T, multiplied in the cheaper order."""
    Ut, Vt = Ustar.mT.unsqueeze(1), Vstar.mT.unsqueeze(1)
    m, n = tau.shape[-2:]
    return (Ut @ tau) @ Vt if n <= m else Ut @ (tau @ Vt)


def project_and_mask(tau, Ustar, Vstar, variant, trim_multiplier, trim_per_task):
    """S [B, p, p] summed over tasks; see ops.project_and_mask."""
    T = tau.shape[1]
    M = project(tau, Ustar, Vstar)
    if variant == "untrimmed":
        return M.sum(dim=1)
    diag = torch.diagonal(M, dim1=-2, dim2=-1)
    S = torch.diag_embed(diag.sum(dim=1))
    if variant == "diag" or M.shape[-1] == 1:
        return S if variant != "offdiag" else torch.zeros_like(S)
    O = M - torch.diag_embed(diag)
    mu = O.mean(dim=(-2, -1), keepdim=True)
    sd = O.flatten(-2).std(dim=-1, correction=1)[..., None, None]
    threshold = trim_multiplier * sd / T if trim_per_task else trim_multiplier * sd
    kept = torch.where((O - mu).abs() <= threshold, O, 0.0).sum(dim=1)
    return kept if variant == "offdiag" else S + kept


def reconstruct(Ustar, S, Vstar, base, alpha, out_dtype):
    """See ops.reconstruct; S [B, p, q], or its diagonal [B, p]."""
    US = Ustar * S[:, None, :] if S.ndim == 2 else Ustar @ S
    out = US @ Vstar
    if base is not None:
        out = torch.add(base.to(out.dtype), out, alpha=alpha)
    return out.to(out_dtype)
