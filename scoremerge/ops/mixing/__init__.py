"""ops.mix: multi-expert weighted parameter mixing over a flat arena (the online-merging kernel).

naive.py: the reference, one parameter at a time. batched.py: the torch backend. triton.py and
cuda.py: one-pass kernels over a per-block table (plan.py) of contiguous group runs.
"""
import torch

from ...backend import lazy, run
from . import batched, cuda

MIX_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def mix(experts, coeffs, bounds=None, *, out=None, backend="auto"):
    """out[j] = sum_k coeffs[g, k] * experts[k, j] for j in bounds[g]:bounds[g+1].

    experts [K, N]: K parameter sets packed as rows (a flat arena; rows contiguous).
    coeffs [G, K]: one row of coefficients per group ([K] means G = 1).
    bounds: G+1 increasing offsets from 0 to N (None: one group over all N); groups are
    contiguous ranges, so no per-element index is read.
    out: [N] contiguous tensor written in place (its dtype is the output dtype), or None for a
    new one in the experts' dtype. Accumulates in float32 (float64 if anything is float64).
    backend: auto | cuda | triton | torch. CUDA mixes float32/bfloat16/float16 into each other
    and float64 into float64; other float64 mixes go to the next backend (named: an error).

    >>> merged = mix(arena, torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]), [0, 1000, 1010])
    """
    _check_tensor("experts", experts, ndim=2)
    K, N = experts.shape
    if K == 0:
        raise ValueError("experts has K = 0 rows: mixing needs at least one parameter set")
    if experts.stride(1) != 1:
        raise ValueError(f"experts rows must be contiguous (stride 1), got strides "
                         f"{experts.stride()}")
    _check_tensor("coeffs", coeffs, ndim=None)
    coeffs = coeffs.unsqueeze(0) if coeffs.ndim == 1 else coeffs
    if coeffs.ndim != 2 or coeffs.shape[1] != K:
        raise ValueError(f"coeffs must be [G, {K}] (or [{K}]) for {K} experts, got "
                         f"{tuple(coeffs.shape)}")
    if coeffs.device != experts.device:
        raise ValueError(f"coeffs on {coeffs.device}, experts on {experts.device}")
    bounds = _check_bounds(bounds, N, coeffs.shape[0])
    if out is None:
        out = torch.empty(N, dtype=experts.dtype, device=experts.device)
    else:
        _check_tensor("out", out, ndim=1)
        if out.shape != (N,) or not out.is_contiguous() or out.device != experts.device:
            raise ValueError(f"out must be a contiguous [{N}] tensor on {experts.device}, got "
                             f"{tuple(out.shape)} on {out.device}")
    coeffs = coeffs.contiguous()
    lacks = cuda.lacks(experts.dtype, coeffs.dtype, out.dtype)
    return run("mix", backend, experts.device,
               {"cuda": lambda: cuda.mix(experts, coeffs, bounds, out),
                "triton": lambda: _triton().mix(experts, coeffs, bounds, out),
                "torch": lambda: batched.mix(experts, coeffs, bounds, out)},
               unsupported={"cuda": lacks} if lacks else None)


def _check_tensor(name, x, ndim):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if x.dtype not in MIX_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")


def _check_bounds(bounds, N, G):
    if bounds is None:
        bounds = (0, N)
    bounds = tuple(int(b) for b in (bounds.tolist() if isinstance(bounds, torch.Tensor) else bounds))
    if len(bounds) != G + 1:
        raise ValueError(f"bounds must hold G + 1 = {G + 1} offsets for {G} coefficient rows, "
                         f"got {len(bounds)}")
    if bounds[0] != 0 or bounds[-1] != N or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"bounds must rise from 0 to N = {N}, got {list(bounds)}")
    return bounds


_triton = lazy("scoremerge.ops.mixing.triton")
