"""Reconstruction Ustar S Vstar for B keys, with base + alpha * (.) and the cast fused into the
second GEMM's store: the [B, m, n] result is written once and nothing reads it back."""
import torch

from .bmm import bmm


def reconstruct(Ustar, S, Vstar, base, alpha, out_dtype, precision="ieee"):
    """[B, m, n]; the arguments as ops.reconstruct."""
    B, m, _ = Ustar.shape
    q, n = S.shape[2], Vstar.shape[2]
    US = torch.empty(B, m, q, dtype=Ustar.dtype, device=Ustar.device)
    bmm(Ustar, S, US, precision=precision)
    out = torch.empty(B, m, n, dtype=out_dtype, device=Ustar.device)
    bmm(US, Vstar, out, base=base, alpha=alpha, precision=precision)
    return out
