"""The Triton backend of ops.project_and_mask and ops.reconstruct, for B keys of one shape.

SCORE's projection into the shared basis with diagonal masking: two launches of the batched GEMM
(triton_bmm.py) over all B*T task matrices, in the cheaper order; the second writes M [B*T, p, p] and, in its epilogue, each tile's off-diagonal sum and sum of squares.
A small torch reduction turns those into a mean and threshold per task matrix (B*T pairs), and
one mask-and-sum launch reads M once: per (key, output tile) it loops over the T tasks, masks and
accumulates, and writes S [B, p, p].

The reconstruction Ustar S Vstar: two launches, with base + alpha * (.) and the cast fused into
the second one's store, so the [B, m, n] result is written once and nothing reads it back.
"""
import torch
import triton
import triton.language as tl

from ...backend.triton import launch_guard
from .triton_bmm import bmm, stats_slots

VARIANT_CODES = {"full": 0, "diag": 1, "offdiag": 2, "untrimmed": 3}


@triton.jit
def _mask_sum_kernel(m_ptr, stats_ptr, s_ptr, T, P,
                     stride_mz, stride_mi, stride_mj,
                     stride_sb, stride_si, stride_sj,
                     VARIANT: tl.constexpr, BLOCK: tl.constexpr):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    ri = (pid_i * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    rj = (pid_j * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    inside = (ri[:, None] < P) & (rj[None, :] < P)
    on_diag = ri[:, None] == rj[None, :]
    acc_dtype = tl.float64 if m_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK, BLOCK), dtype=acc_dtype)
    for t in range(T):
        z = b * T + t
        M = tl.load(m_ptr + z * stride_mz + ri[:, None] * stride_mi + rj[None, :] * stride_mj,
                    mask=inside, other=0.0).to(acc_dtype)
        if VARIANT == 3:
            acc += M
        else:
            if VARIANT != 2:
                acc += tl.where(on_diag, M, 0.0)
            if VARIANT != 1:
                mu = tl.load(stats_ptr + z * 2)
                threshold = tl.load(stats_ptr + z * 2 + 1)
                off = tl.where(on_diag, 0.0, M)
                keep = (tl.abs(off.to(tl.float64) - mu) <= threshold) & (~on_diag)
                acc += tl.where(keep, off, 0.0)
    tl.store(s_ptr + b * stride_sb + ri[:, None] * stride_si + rj[None, :] * stride_sj,
             acc.to(s_ptr.dtype.element_ty), mask=inside)


def mask_statistics(partial, p, scale):
    """[Z, 2] float64 (mean, threshold) per task matrix from its tiles' off-diagonal sums and
    sums of squares: mean and Bessel-corrected sd over all p*p entries of M with its diagonal
    zeroed, threshold = scale * sd."""
    total, squares = partial.sum(dim=1).unbind(-1)
    n = p * p
    mu = total / n
    sd = ((squares - total * mu) / (n - 1)).clamp_min(0.0).sqrt()
    return torch.stack([mu, scale * sd], dim=-1).contiguous()


def project(tau, Ustar, Vstar, precision, partial=None):
    """M [B*T, p, p] = Ustar^T tau_t Vstar^T for every (key, task); optionally the off-diagonal
    tile statistics of M into `partial` (see bmm)."""
    B, T, m, n = tau.shape
    p = Ustar.shape[-1]
    tau_z = tau.reshape(B * T, m, n)          # a view for the stacked tau the methods pass
    Ut = Ustar.mT.contiguous()                # small; K-contiguous operands load 16 bytes at once
    M = torch.empty(B * T, p, p, dtype=tau.dtype, device=tau.device)
    if n <= m:                 # X = Ustar^T tau_t is [p, n]: the smaller intermediate
        X = torch.empty(B * T, p, n, dtype=tau.dtype, device=tau.device)
        bmm(Ut, tau_z, X, a_div=T, precision=precision)
        return bmm(X, Vstar.mT, M, b_div=T, partial=partial, precision=precision)
    Y = torch.empty(B * T, m, p, dtype=tau.dtype, device=tau.device)
    bmm(tau_z, Vstar.mT, Y, b_div=T, precision=precision)
    return bmm(Ut, Y, M, a_div=T, partial=partial, precision=precision)


def project_and_mask(tau, Ustar, Vstar, variant, trim_multiplier, trim_per_task,
                     precision="ieee"):
    """S [B, p, p]; the arguments as ops.project_and_mask (which hands the diag and untrimmed
    variants the task sum)."""
    B, T, m, n = tau.shape
    p = Ustar.shape[-1]
    if p == 1 and variant in ("full", "offdiag"):     # no off-diagonal entries to mask
        variant = "diag" if variant == "full" else "zero"
    if variant == "zero":
        return torch.zeros(B, 1, 1, dtype=tau.dtype, device=tau.device)
    needs_stats = variant in ("full", "offdiag")
    partial = (torch.empty(B * T, stats_slots(p, p, tau.element_size()), 2, dtype=torch.float64,
                           device=tau.device) if needs_stats else None)
    M = project(tau, Ustar, Vstar, precision, partial)
    scale = trim_multiplier / T if trim_per_task else trim_multiplier
    stats = mask_statistics(partial, p, scale) if needs_stats else M
    S = torch.empty(B, p, p, dtype=tau.dtype, device=tau.device)
    block = 32 if p > 16 else 16
    grid = (triton.cdiv(p, block), triton.cdiv(p, block), B)
    with launch_guard():
        _mask_sum_kernel[grid](
            M, stats, S, T, p, M.stride(0), M.stride(1), M.stride(2),
            S.stride(0), S.stride(1), S.stride(2), VARIANT=VARIANT_CODES[variant], BLOCK=block)
    return S


def reconstruct(Ustar, S, Vstar, base, alpha, out_dtype, precision="ieee"):
    """[B, m, n]; the arguments as ops.reconstruct (S [B, p, q], or its diagonal [B, p])."""
    B, m, _ = Ustar.shape
    q, n = S.shape[-1], Vstar.shape[2]
    if S.ndim == 2:
        US = (Ustar * S[:, None, :]).contiguous()
    else:
        US = torch.empty(B, m, q, dtype=Ustar.dtype, device=Ustar.device)
        bmm(Ustar, S, US, precision=precision)
    out = torch.empty(B, m, n, dtype=out_dtype, device=Ustar.device)
    bmm(US, Vstar, out, base=base, alpha=alpha, precision=precision)
    return out
