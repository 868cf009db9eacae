"""ops.project_and_mask: SCORE's projection into the shared basis with diagonal masking."""
from ..backend import run
from ..kernels.torch import projection as torch_projection
from ._checks import check_matrix_batch, check_precision, check_same, default_precision

VARIANTS = ("full", "diag", "offdiag", "untrimmed")


def project_and_mask(tau, Ustar, Vstar, *, variant="full", trim_multiplier=1.96,
                     trim_per_task=True, precision=None, backend="auto"):
    """The summed masked projection of ALGORITHMS.md steps 4-6 for B keys of one shape.

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

    def triton():
        from ..kernels.triton.project_and_mask import project_and_mask as triton_project_and_mask
        return triton_project_and_mask(tau, Ustar, Vstar, variant, trim_multiplier,
                                       trim_per_task, default_precision(precision, tau))

    return run("project_and_mask", backend, tau.device, {
        "triton": triton,
        "torch": lambda: torch_projection.project_and_mask(tau, Ustar, Vstar, variant,
                                                           trim_multiplier, trim_per_task)})
