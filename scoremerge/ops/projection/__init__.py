"""ops.project_and_mask and ops.reconstruct: SCORE's projection into the shared basis with
diagonal masking, and the reconstruction Ustar S Vstar (optionally added to a base and cast).

naive.py: the references, one key and one task at a time. batched.py: the torch backend, all
keys and tasks of one shape at once. triton.py: the Triton kernels, on triton_bmm.py's batched
GEMM with fused epilogues.
"""
from ...backend import lazy, run
from ..checks import check_matrix_batch, check_precision, check_same, default_precision
from . import batched

VARIANTS = ("full", "diag", "offdiag", "untrimmed")


def project_and_mask(tau, Ustar, Vstar, *, variant="full", trim_multiplier=1.96,
                     trim_per_task=True, precision=None, backend="auto"):
    """SCORE's summed masked projection (docs/algorithms.md, steps 4-6) for B keys of one shape.

    tau [B, T, m, n] task matrices, Ustar [B, m, p], Vstar [B, p, n] shared bases -> S [B, p, p]:
    S = sum_t (diag(M_t) + kept off-diagonal of M_t), M_t = Ustar^T tau_t Vstar^T, where an
    off-diagonal entry is kept when within trim_multiplier * sd_t (/ T if trim_per_task) of the
    mean of M_t with its diagonal zeroed. variant: full | diag | offdiag | untrimmed.
    precision: the Triton backend's fp32 matrix products: "ieee" (fp32 FMA), "tf32x3" (three
    tf32 tensor-core products, about fp32's accuracy) or "tf32" (fastest, ~1e-3 relative);
    None (default): tf32x3 for fp32 on a GPU, ieee otherwise. torch ignores it (full fp32).

    >>> S = project_and_mask(tau, Ustar, Vstar)          # tau: [12, 3, 768, 768], p = 768
    """
    check_matrix_batch("tau", tau, ndim=4)
    check_matrix_batch("Ustar", Ustar)
    check_matrix_batch("Vstar", Vstar)
    check_same("dtype", tau=tau, Ustar=Ustar, Vstar=Vstar)
    check_same("device", tau=tau, Ustar=Ustar, Vstar=Vstar)
    B, T, m, n = tau.shape
    p = Ustar.shape[-1]
    if Ustar.shape != (B, m, p) or Vstar.shape != (B, p, n):
        raise ValueError(f"shapes do not fit: tau {tuple(tau.shape)} needs Ustar [B, m, p] = "
                         f"[{B}, {m}, p] and Vstar [B, p, n] = [{B}, p, {n}]; got Ustar "
                         f"{tuple(Ustar.shape)}, Vstar {tuple(Vstar.shape)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    check_precision(precision)
    if variant in ("untrimmed", "diag") and T > 1:
        # these read the projections only through their sum over tasks, and projecting is
        # linear: every backend projects the task sum once instead of each of the T tasks
        tau = tau.sum(dim=1, keepdim=True)

    return run("project_and_mask", backend, tau.device, {
        "triton": lambda: _triton().project_and_mask(tau, Ustar, Vstar, variant, trim_multiplier,
                                                     trim_per_task,
                                                     default_precision(precision, tau)),
        "torch": lambda: batched.project_and_mask(tau, Ustar, Vstar, variant, trim_multiplier,
                                                  trim_per_task)})


def reconstruct(Ustar, S, Vstar, *, base=None, alpha=1.0, out_dtype=None, precision=None,
                backend="auto"):
    """Ustar [B, m, p] @ S [B, p, q] @ Vstar [B, q, n] -> [B, m, n], or base + alpha * that when
    base [B, m, n] is given (any float dtype), cast to out_dtype (default: S's dtype).
    S may also be a diagonal, given as [B, p] (q = p): TSV-M's and the Iso methods' spectra,
    which then cost no p x p product. precision: as in project_and_mask (Triton only).

    >>> W = reconstruct(Ustar, S, Vstar, base=W0, alpha=1.0, out_dtype=torch.bfloat16)
    """
    for name, x in (("Ustar", Ustar), ("Vstar", Vstar)):
        check_matrix_batch(name, x)
    check_matrix_batch("S", S, ndim=2 if S.ndim == 2 else 3)
    check_same("dtype", Ustar=Ustar, S=S, Vstar=Vstar)
    check_same("device", Ustar=Ustar, S=S, Vstar=Vstar)
    B, m, p = Ustar.shape
    q = S.shape[-1]
    if S.shape[0] != B or S.shape[1] != p or Vstar.shape[:2] != (B, q):
        raise ValueError(f"shapes do not chain: Ustar {tuple(Ustar.shape)}, S {tuple(S.shape)}, "
                         f"Vstar {tuple(Vstar.shape)}")
    if base is not None and base.shape != (B, m, Vstar.shape[2]):
        raise ValueError(f"base must be [{B}, {m}, {Vstar.shape[2]}], got {tuple(base.shape)}")
    if base is not None and base.device != Ustar.device:
        raise ValueError(f"base is on {base.device}, the factors on {Ustar.device}")
    check_precision(precision)

    return run("reconstruct", backend, Ustar.device, {
        "triton": lambda: _triton().reconstruct(Ustar, S, Vstar, base, alpha,
                                                out_dtype or S.dtype,
                                                default_precision(precision, Ustar)),
        "torch": lambda: batched.reconstruct(Ustar, S, Vstar, base, alpha,
                                             out_dtype or S.dtype)})


_triton = lazy("scoremerge.ops.projection.triton")
