"""Plain-torch reference for multi-expert weighted parameter mixing (docs/algorithms.md,
"Multi-expert mixing"), written one group and one expert at a time."""
import torch


def mix(experts, coeffs, bounds=None, out_dtype=None):
    """out[j] = sum_k coeffs[g, k] * experts[k, j] for j in bounds[g]:bounds[g+1].

    experts [K, N], coeffs [G, K], bounds G+1 offsets (None: one group over all N). Accumulates
    in float32 (float64 when experts or coeffs are float64); returns [N] in out_dtype (default:
    the experts' dtype)."""
    K, N = experts.shape
    bounds = [0, N] if bounds is None else [int(b) for b in bounds]
    wide = torch.float64 in (experts.dtype, coeffs.dtype)
    acc_dtype = torch.float64 if wide else torch.float32
    out = torch.zeros(N, dtype=acc_dtype, device=experts.device)
    for g in range(len(bounds) - 1):
        lo, hi = bounds[g], bounds[g + 1]
        for k in range(K):
            out[lo:hi] += coeffs[g, k].to(acc_dtype) * experts[k, lo:hi].to(acc_dtype)
    return out.to(out_dtype or experts.dtype)
