"""ops.reconstruct: Ustar S Vstar, optionally added to a base and cast on store."""
from ..backend import run
from ..kernels.torch import projection as torch_projection
from ._checks import check_matrix_batch, check_precision, check_same, default_precision


def reconstruct(Ustar, S, Vstar, *, base=None, alpha=1.0, out_dtype=None, precision=None,
                backend="auto"):
    """Ustar [B, m, p] @ S [B, p, q] @ Vstar [B, q, n] -> [B, m, n], or base + alpha * that when
    base [B, m, n] is given (any float dtype), cast to out_dtype (default: S's dtype).
    precision: as in project_and_mask (Triton only).

    >>> W = reconstruct(Ustar, S, Vstar, base=W0, alpha=1.0, out_dtype=torch.bfloat16)
    """
    for name, x in (("Ustar", Ustar), ("S", S), ("Vstar", Vstar)):
        check_matrix_batch(name, x)
    check_same("dtype", Ustar=Ustar, S=S, Vstar=Vstar)
    check_same("device", Ustar=Ustar, S=S, Vstar=Vstar)
    B, m, p = Ustar.shape
    if S.shape[0] != B or S.shape[1] != p or Vstar.shape[:2] != (B, S.shape[2]):
        raise ValueError(f"shapes do not chain: Ustar {tuple(Ustar.shape)}, S {tuple(S.shape)}, "
                         f"Vstar {tuple(Vstar.shape)}")
    if base is not None and base.shape != (B, m, Vstar.shape[2]):
        raise ValueError(f"base must be [{B}, {m}, {Vstar.shape[2]}], got {tuple(base.shape)}")
    if base is not None and base.device != Ustar.device:
        raise ValueError(f"base is on {base.device}, the factors on {Ustar.device}")
    check_precision(precision)

    def triton():
        from ..kernels.triton.reconstruct import reconstruct as triton_reconstruct
        return triton_reconstruct(Ustar, S, Vstar, base, alpha, out_dtype or S.dtype,
                                  default_precision(precision, Ustar))

    return run("reconstruct", backend, Ustar.device, {
        "triton": triton,
        "torch": lambda: torch_projection.reconstruct(Ustar, S, Vstar, base, alpha,
                                                      out_dtype or S.dtype)})
