"""The inputs doctor runs every op on, and how to call the op and its plain-torch reference.

Small, odd-shaped (no power of two), random, seeded, tall and wide: the shapes kernels get wrong
(tile edges, masks, transposed paths), small enough for Triton's CPU interpreter to take seconds.
Each case is drawn in float64 and rounded to the check's dtype, so the float32 and float64 checks
of one seed see the same input up to rounding.
"""
from dataclasses import dataclass, field

import torch

from .. import ops, ref


@dataclass(frozen=True)
class OpCase:
    """One op's checks: the dtypes it takes, its input shapes, and
    make(shape, dtype, generator) -> inputs (a dict; tensors on the CPU),
    call(inputs, backend) -> outputs (a tuple), reference(inputs, out_dtype=None) -> outputs,
    and for the float64 bound: mirror(inputs) -> (inputs of the same problem posed another way,
    a function taking its outputs back to the original's), so that the reference's own float64
    error can be measured; growth(answer, inputs) -> how much the fast path's float64 algorithm
    may lose against the reference's (1 but for the Gram route of the SVD and polar factor);
    plain32(inputs) -> the plain-torch float32 result (default: the reference). align(outputs,
    answer) -> the outputs made comparable where the op's result is unique only up to signs."""
    op: str
    dtypes: tuple
    shapes: tuple
    outputs: tuple
    make: object = field(repr=False)
    call: object = field(repr=False)
    reference: object = field(repr=False)
    mirror: object = field(repr=False)
    growth: object = field(default=None, repr=False)
    align: object = field(default=None, repr=False)
    plain32: object = field(default=None, repr=False)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _orthonormal(g, batch, rows, cols):
    """QR's Q comes column-major: the tall bases reach the kernels strided, the wide ones not."""
    q, _ = torch.linalg.qr(_randn(g, batch, max(rows, cols), min(rows, cols)))
    return q if rows >= cols else q.mT.contiguous()


# ---- truncated SVD and polar factor (float32 or float64 only: ops.truncated_svd's contract)

def _svd_make(shape, dtype, g):
    B, m, n, k = shape
    return {"A": _randn(g, B, m, n).to(dtype), "k": k}


def _svd_align(outputs, answer):
    """Singular vectors are unique up to a sign per pair; the op and the reference fix it the
    same way (docs/algorithms.md), but where a column's two largest entries nearly tie, rounding may
    pick the other one. Flip each pair to agree with the answer's, so only values are compared."""
    U, S, Vh = outputs
    sign = torch.sign((U.double() * answer[0]).sum(dim=-2))
    sign = torch.where(sign == 0, 1.0, sign).to(U.dtype)
    return U * sign[..., None, :], S, Vh * sign[..., :, None]


def _svd_growth(answer, inputs):
    """kappa = s_1 / s_k of the kept triplets: float64 Gram eigenvectors carry eps64 * kappa^2
    where the reference's SVD carries eps64 * kappa (ops/linalg/gram64.py)."""
    S = answer[1]
    return (S[..., 0] / S[..., -1]).max().item()


def _polar_growth(answer, inputs):
    """kappa = s_max / s_min of the input, for the same reason as _svd_growth."""
    s = torch.linalg.svdvals(inputs["A"].double())
    return (s[..., 0] / s[..., -1]).max().item()


def _transposed(outputs):
    return tuple(out.mT for out in outputs)


TRUNCATED_SVD = OpCase(
    "truncated_svd", (torch.float32, torch.float64), ((3, 29, 17, 5), (2, 13, 31, 4)),
    ("U", "S", "Vh"), _svd_make,
    call=lambda x, backend: ops.truncated_svd(x["A"], x["k"], backend=backend),
    reference=lambda x, out_dtype=None: ref.truncated_svd(x["A"], x["k"]),
    mirror=lambda x: ({"A": x["A"].mT.contiguous(), "k": x["k"]},      # A^T = V S U^T
                      lambda out: (out[2].mT, out[1], out[0].mT)),
    growth=_svd_growth, align=_svd_align)

POLAR = OpCase(
    "polar", (torch.float32, torch.float64), ((3, 23, 15), (2, 9, 20)), ("P",),
    make=lambda shape, dtype, g: {"A": _randn(g, *shape).to(dtype)},
    call=lambda x, backend: (ops.polar(x["A"], backend=backend),),
    reference=lambda x, out_dtype=None: (ref.polar(x["A"]),),
    mirror=lambda x: ({"A": x["A"].mT.contiguous()}, _transposed),      # polar(A^T) = polar(A)^T
    growth=_polar_growth)


# ---- SCORE's projection with masking, and the reconstruction

def _projection_make(shape, dtype, g):
    B, T, m, n, p = shape
    return {"tau": _randn(g, B, T, m, n).to(dtype), "U": _orthonormal(g, B, m, p).to(dtype),
            "V": _orthonormal(g, B, p, n).to(dtype)}


def _projection_reference(x, out_dtype=None):
    return (torch.stack([ref.project_and_mask(x["tau"][b], x["U"][b], x["V"][b])
                         for b in range(x["tau"].shape[0])]),)


def _projection_mirror(x):
    """V tau_t^T U = M_t^T, and the masking statistics do not see a transpose: S^T."""
    return ({"tau": x["tau"].mT.contiguous(), "U": x["V"].mT.contiguous(),
             "V": x["U"].mT.contiguous()}, _transposed)


PROJECT_AND_MASK = OpCase(
    "project_and_mask", (torch.float32, torch.float64), ((2, 3, 21, 17, 15), (1, 4, 11, 19, 11)),
    ("S",), _projection_make,
    call=lambda x, backend: (ops.project_and_mask(x["tau"], x["U"], x["V"], backend=backend),),
    reference=_projection_reference, mirror=_projection_mirror)


def _reconstruct_make(shape, dtype, g):
    """bfloat16: the factors in float32 (the compute dtype), the base and the output in bf16,
    as a merge writes a bf16 model."""
    B, m, p, q, n = shape
    factors = torch.float64 if dtype == torch.float64 else torch.float32
    return {"U": _randn(g, B, m, p).to(factors), "S": _randn(g, B, p, q).to(factors),
            "V": _randn(g, B, q, n).to(factors), "base": _randn(g, B, m, n).to(dtype),
            "alpha": 0.37, "out_dtype": dtype}


def _reconstruct_reference(x, out_dtype=None):
    out_dtype = out_dtype or x["out_dtype"]
    return (torch.stack([ref.reconstruct(x["U"][b], x["S"][b], x["V"][b], base=x["base"][b],
                                         alpha=x["alpha"], out_dtype=out_dtype)
                         for b in range(x["U"].shape[0])]),)


def _reconstruct_mirror(x):
    """W^T = base^T + alpha V^T S^T U^T."""
    flipped = {"U": x["V"].mT, "S": x["S"].mT, "V": x["U"].mT, "base": x["base"].mT}
    return {**x, **{k: v.contiguous() for k, v in flipped.items()}}, _transposed


RECONSTRUCT = OpCase(
    "reconstruct", (torch.float32, torch.bfloat16, torch.float64),
    ((2, 19, 7, 7, 23), (1, 12, 9, 5, 31)), ("W",), _reconstruct_make,
    call=lambda x, backend: (ops.reconstruct(x["U"], x["S"], x["V"], base=x["base"],
                                             alpha=x["alpha"], out_dtype=x["out_dtype"],
                                             backend=backend),),
    reference=_reconstruct_reference, mirror=_reconstruct_mirror)


# ---- multi-expert mixing and entropy weights

def _mix_make(shape, dtype, g):
    K, N, G = shape
    cuts = sorted(torch.randint(1, N, (G - 1,), generator=g).tolist())
    coeffs = torch.softmax(_randn(g, G, K), dim=1)
    return {"experts": _randn(g, K, N).to(dtype), "bounds": [0, *cuts, N],
            "coeffs": coeffs.to(torch.float64 if dtype == torch.float64 else torch.float32)}


def _mix_call(x, backend):
    """Into a NaN-filled output: an element the kernel does not write fails the check."""
    out = torch.full((x["experts"].shape[1],), float("nan"), dtype=x["experts"].dtype,
                     device=x["experts"].device)
    return (ops.mix(x["experts"], x["coeffs"], x["bounds"], out=out, backend=backend),)


MIX = OpCase(
    "mix", (torch.float32, torch.bfloat16, torch.float64), ((5, 10007, 3), (3, 4099, 1)),
    ("out",), _mix_make, call=_mix_call,
    reference=lambda x, out_dtype=None: (ref.mixing.mix(x["experts"], x["coeffs"], x["bounds"],
                                                        out_dtype=out_dtype),),
    mirror=lambda x: ({**x, "experts": x["experts"].flip(0).contiguous(),   # summed the other way
                       "coeffs": x["coeffs"].flip(1).contiguous()}, lambda out: out))


def _entropy_make(shape, dtype, g):
    return {"logits": (3 * _randn(g, *shape)).to(dtype)}


def _entropy_call(x, backend):
    return ops.entropy_weights(x["logits"], 0.5)


# The reference computes in float64 (Python floats) whatever it is given, and the op has no
# kernel: it is itself the plain-torch computation. So it is checked in float64 only, against
# a bound scaled from its own float32 error.
ENTROPY_WEIGHTS = OpCase(
    "entropy_weights", (torch.float64,), ((17, 16, 10), (29, 7, 33)), ("weights", "entropies"),
    _entropy_make, call=_entropy_call,
    reference=lambda x, out_dtype=None: ref.entropy.entropy_weights(x["logits"], 0.5),
    mirror=lambda x: ({"logits": x["logits"].flip(-1)}, lambda out: out),   # classes reversed
    plain32=lambda x: _entropy_call(x, "torch"))

CASES = {case.op: case for case in (TRUNCATED_SVD, POLAR, PROJECT_AND_MASK, RECONSTRUCT, MIX,
                                    ENTROPY_WEIGHTS)}
