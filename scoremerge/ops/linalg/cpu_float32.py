"""Truncated SVD and polar factor of float32 matrices on a CPU: a float32 Gram eigensolver,
refined by float32 products and small float64 problems.

Why: on a CPU the dense eigensolver is the wall. One thread, 768x768: float64 eigh 108 ms,
float32 eigh 66 ms, float32 SVD 177 ms, a float32 768^3 product 5 ms (measured under a load of
6 on 2 cores; under heavier load products slow down most, see bench/svd_cpu_vs_peers.py). The
float64 Gram route (gram64.py) pays a float64 Gram product and eigh per matrix; this route pays
a float32 Gram product and eigh plus a few float32 products, and keeps float32 SVD's accuracy:

- Truncated SVD: the float32 Gram matrix squares the condition number, so its eigenvectors carry
  errors near eps32 * (s_1 / s_i)^2 / gap, kappa times float32 SVD's. Its top l = k + p
  eigenvectors still span the top-k singular subspace up to eps32 * kappa_k^2 / (the gap between
  s_k^2 and s_l^2); one subspace-iteration step with X (float32 products: float32 SVD's own
  rounding) shrinks that by s_l^2 / s_k^2, Rayleigh-Ritz on the l-dimensional subspace (an
  l x l float64 eigenproblem, (l/n)^3 of the big one) resolves the directions inside it, and a
  last product gives V one step more (the side SCORE's square polar factor amplifies).
- Polar factor: X (X^T X)^{-1/2} from the float32 Gram eigensolver, accurate while kappa(X) is
  small; its error is mostly non-orthonormality, which one Newton-Schulz step removes, taken
  through the Gram matrix (_polished; 2304x768 and 768x3072, kappa 8..16: 0.5x..1.5x float32
  SVD's error, measured).

Items outside the guards are recomputed the reference's way or better: truncated SVDs by the
float64 Gram route (which itself falls back to SVD), polar factors by float32 SVD, exactly the
reference's computation. SCORE's square concatenated bases (kappa 1e3..2e4) always land there:
float32 SVD cost 292 ms against the float64 Gram route's 604 ms (768x768, one thread, load 6),
and moved the merged model's error from 0.2-0.5x to 0.3-0.5x of the reference's (measured).
"""
import torch

from ...parallel import map_batch
from ..cpu_matmul import matmul
from . import gram64
from .gram import gram

# Which items the refinement takes, from kappa_k = s_1 / s_k and rho = s_{l+1}^2 / s_k^2 of the
# float32 Gram eigenvalues (accurate enough to decide): kappa_k <= 8, or kappa_k <= 20 with
# rho <= 0.8. The start's error outside the top l grows as kappa_k^2 and one subspace step
# shrinks it by rho only, while float32 SVD's grows as kappa_k: on 72 random matrices (power-law,
# low rank plus flat or Gaussian noise, three k per shape) every item this admits came within
# 0.7x of float32 SVD's error (rank-k product and both subspaces), while kappa_k 27..40, or
# kappa_k 9 on a flat tail (rho 0.9), reached 1.7x..14x. The rest take the float64 route.
_KAPPA_ALWAYS = 8.0
_KAPPA_WITH_GAP = 20.0
_RHO_MAX = 0.8
# Batches whose items all have kappa_k <= this skip the subspace-iteration step (two of the
# refinement's four passes over X): there the start is already good (same 72 matrices: within
# 0.9x of float32 SVD's error without it).
_KAPPA_NO_STEP = 4.0
# Largest kappa(X) for the float32 polar factor (and a full-rank SVD): there its error stays
# within 2x of float32 SVD's (see the module docstring); past _KAPPA_NO_POLISH it takes the
# Newton-Schulz step (unpolished: 1.1x float32 SVD's error at kappa 5, 1.65x at 10; with the
# step 0.5x at kappa 6.3, 0.6x-0.7x at 8).
_KAPPA_DIRECT = 16.0
_KAPPA_NO_POLISH = 6.0
# Below this min(m, n) the float64 Gram route is as fast or faster: its eigenproblem is small,
# and this route's extra steps cost more than they save (SCORE over ViT-block shapes of width d,
# T = 5, one process, quiet machine: d = 48 28 ms here against 20 ms, 128 49 vs 46, 160 66 vs
# 65, 192 98 vs 102, 224 119 vs 160, 512 775 vs 1028).
_MIN_SIZE = 192
# The refinement's float64 l x l eigenproblem costs (l/n)^3 of a float64 n x n one; past this
# share of n the float64 Gram route is cheaper than float32 eigh plus refinement.
_MAX_SUBSPACE_SHARE = 0.7


def applies(A):
    """Whether this route serves A: float32 on a CPU, with min(m, n) >= _MIN_SIZE. float64
    keeps the float64 Gram route (the tests' reference precision), and CUDA devices keep theirs
    (gram64.py, with cuSOLVER's eigensolver on the cuda backend). batched.py, the torch
    backend's entry points, routes here by it."""
    return A.device.type == "cpu" and A.dtype == torch.float32 and min(A.shape[-2:]) >= _MIN_SIZE


def oversampling(k):
    """Extra directions p of the refined subspace. Its error outside the top k shrinks with
    s_{k+p} / s_k per product with X, and slowly decaying spectra open that gap only over many
    directions: at s_i ~ i^-0.5, T = 3, p = k/8 or k/4 left the merged model at 1.5-2.5x float32
    SVD's error, p = k/2 at 0.3-0.6x (measured)."""
    return max(16, k // 2)


def _eigh_descending(G):
    w, Q = torch.linalg.eigh(G)
    return w.flip(-1), Q.flip(-1)


def _cholqr64(Z):
    """Orthonormal basis of float32 Z [b, n, l] as float64 (Cholesky QR), and a per-item flag
    (False where Z is numerically rank-deficient)."""
    Z = Z.double()
    R, info = torch.linalg.cholesky_ex(Z.mT @ Z, upper=True)
    ok = info == 0
    R = torch.where(ok[:, None, None], R, torch.eye(R.shape[-1], dtype=R.dtype))
    return torch.linalg.solve_triangular(R, Z, upper=True, left=False), ok


def _refinable(w, k, l):
    """Per item, from descending float32 Gram eigenvalues w [b, n]: does the refinement reach
    float32 SVD's accuracy for the top k from the top l (see _KAPPA_ALWAYS)?"""
    w_k = w[:, k - 1]
    rho = w[:, l] / w_k if l < w.shape[-1] else torch.zeros_like(w_k)
    admitted = (w[:, 0] <= _KAPPA_ALWAYS**2 * w_k) | \
               ((w[:, 0] <= _KAPPA_WITH_GAP**2 * w_k) & (rho <= _RHO_MAX))
    return torch.isfinite(w).all(-1) & (w_k > 0) & admitted


def _refined_svd(X, k, l):
    """Top-k triplets (U, s, V) of float32 X [b, m, n], m >= n, from the float32 Gram's top-l
    eigenvectors, a subspace-iteration step, float64 Rayleigh-Ritz and a last product for V;
    and a per-item flag (False: redo by the float64 route)."""
    w, Q = _eigh_descending(gram(X))
    ok = _refinable(w, k, l)
    Z = Q[..., :l]
    if not (w[:, 0] <= _KAPPA_NO_STEP**2 * w[:, k - 1]).all():
        # X^T X Z / w: Z again, sharpened by s^2 / s_l^2; the division keeps columns O(1)
        scale = torch.where(ok[:, None], w[:, :l], 1.0)[:, None, :]
        Z = torch.nan_to_num(matmul(X.mT, matmul(X, Z)) / scale)
    # re-orthonormalised in float64 even without the step: the float32 eigensolver's vectors
    # are orthonormal to ~3e-6 only (||Z^T Z - I||, 3072 x 768), and taking them as they are
    # raised SCORE's error from 1.5e-3 to 4.5e-3 (T = 4, one ViT-B block, measured)
    basis, independent = _cholqr64(Z)
    B = matmul(X, basis.float())
    # B's columns are nearly orthogonal, so float32 rounds each entry of B^T B relative to
    # |b_i| |b_j|, not to s_1^2; the float64 eigensolver then keeps that relative accuracy
    w2, W = _eigh_descending(gram(B).double())
    s = w2[:, :k].clamp_min(0).sqrt()
    ok &= independent & (s[:, -1] * gram64._MAX_KAPPA > s[:, 0])
    inv_s = (1.0 / torch.where(ok[:, None], s, 1.0)).float()
    U = matmul(B, W[..., :k].float()) * inv_s[:, None, :]
    # V from U (X^T U / s), not from the basis: one more product with X shrinks V's error
    # outside the top-k subspace by s_j / s_k, the error that the polar factor of a nearly
    # singular concatenation (SCORE's square side) amplifies most
    return U, s.float(), matmul(X.mT, U) * inv_s[:, None, :], ok


def _direct_svd(X):
    """All n triplets of float32 X [b, m, n], m >= n, from the float32 Gram eigensolver; flag:
    kappa(X) <= _KAPPA_DIRECT. Items _well_conditioned declines skip the eigensolver (left
    unwritten, flagged): Iso-C's summed 768 x 768 attention projections, kappa ~3e3, spent
    25 ms of float32 eigh each before the float64 route redid them."""
    G = gram(X)
    ok = _well_conditioned(G)
    b, m, n = X.shape
    U, s, V = X.new_empty(b, m, n), X.new_ones(b, n), X.new_empty(b, n, n)
    if ok.any():
        some = slice(None) if ok.all() else ok
        w, Q = _eigh_descending(G[some])
        good = torch.isfinite(w).all(-1) & (w[:, 0] <= _KAPPA_DIRECT**2 * w[:, -1])
        root = torch.where(good[:, None], w, 1.0).clamp_min(1e-30).sqrt()
        R = _polished(Q / root[:, None, :], G[some], root[:, 0] / root[:, -1])
        U[some] = matmul(X[some], R)
        s[some], V[some] = root, Q
        ok = ok.masked_scatter(ok, good)
    return U, s, V, ok


def _polished(R, G, kappa):
    """R [b, n, k] such that X R is nearly orthonormal, G = X^T X: on the items with
    kappa > _KAPPA_NO_POLISH, R (3I - R^T G R) / 2, so that X R takes one Newton-Schulz step,
    P (3I - P^T P) / 2, without forming P^T P from P (n^3 work in place of 2 m n^2). From the
    same float32 Gram matrix the error left is within 0.5x float32 SVD's (Iso-C's summed qkv
    and fc1 matrices, kappa 6.3 and 5.2: 9.2e-7 and 8.4e-7 against 2.0e-6 and 1.9e-6; the
    step on P itself 6.8e-7 and 6.2e-7, measured)."""
    rough = kappa > _KAPPA_NO_POLISH
    if rough.any():
        some = slice(None) if rough.all() else rough
        Rr = R[some]
        R[some] = 1.5 * Rr - 0.5 * matmul(Rr, matmul(Rr.mT, matmul(G[some], Rr)))
    return R


def truncated_svd(A, k):
    """Top-k singular triplets of float32 A [b, m, n] on a CPU: U [b, m, k], S [b, k],
    Vh [b, k, n], values descending, signs as the eigensolvers left them (like
    gram64.truncated_svd, the float64 Gram route that takes the items this route declines)."""
    tall = A.shape[-2] >= A.shape[-1]
    X = A if tall else A.mT
    n = X.shape[-1]
    l = min(n, k + oversampling(k))
    if k < n and l > _MAX_SUBSPACE_SHARE * n:
        return gram64.truncated_svd(A, k)
    if k < n:
        P, s, Q, ok = map_batch(lambda x: _refined_svd(x, k, l), X)
    else:
        P, s, Q, ok = map_batch(_direct_svd, X)
    U, Vh = (P, Q.mT) if tall else (Q, P.mT)
    if not ok.all():
        redo = ~ok
        U[redo], s[redo], Vh[redo] = gram64.truncated_svd(A[redo], k)
    return U, s, Vh


def _well_conditioned(G):
    """Per item of symmetric positive semi-definite float32 G [b, n, n]: is lambda_min(G) above
    lambda_max / _KAPPA_DIRECT^2? One Cholesky of the shifted matrix answers (a tenth of an
    eigh), so ill-conditioned items skip the float32 eigensolver; lambda_max from four power
    steps, a slight underestimate that the exact check after the eigensolver covers."""
    x = G.sum(-1, keepdim=True) + 1.0
    for _ in range(4):
        x = G @ (x / x.norm(dim=-2, keepdim=True))
    shift = x.norm(dim=-2, keepdim=True) / _KAPPA_DIRECT**2
    eye = torch.eye(G.shape[-1], dtype=G.dtype)
    return torch.linalg.cholesky_ex(G - shift * eye).info == 0


def _polar32(A, tall):
    """Polar factor of float32 A [b, m, n] in its own orientation (a wide A's Gram matrix is
    A A^T and its factor W A: no transposed copies), and a per-item flag kappa <= _KAPPA_DIRECT
    (items without it are left unwritten)."""
    G = gram(A if tall else A.mT)
    ok = _well_conditioned(G)
    out = torch.empty_like(A)
    if ok.any():
        some = slice(None) if ok.all() else ok        # a view, not a copy, in the usual case
        w, Q = torch.linalg.eigh(G[some])
        good = torch.isfinite(w).all(-1) & (w[:, -1] <= _KAPPA_DIRECT**2 * w[:, 0])
        w = torch.where(good[:, None], w, 1.0).clamp_min(1e-30)
        # P = A W (tall), or its transpose's, W A (wide): W = G^(-1/2) either way
        W = _polished(matmul(Q * w.rsqrt()[:, None, :], Q.mT), G[some],
                      (w[:, -1] / w[:, 0]).sqrt())
        out[some] = matmul(A[some], W) if tall else matmul(W.mT, A[some])
        ok = ok.masked_scatter(ok, good)
    return out, ok


def polar_reference(X):
    """The reference's polar factor (naive.polar): P Q from float32 SVD X = P S Q, with torch's
    own product, so that the items this route declines get exactly the reference's result
    (768 x 768: the product 10 ms against the SVD's 131 ms, one thread, one-off)."""
    P, _, Q = torch.linalg.svd(X, full_matrices=False)
    return P @ Q


def polar(A):
    """Orthogonal polar factor of float32 A [b, m, n] on a CPU (thin SVD A = P S Q -> P Q)."""
    tall = A.shape[-2] >= A.shape[-1]
    out, ok = map_batch(lambda a: _polar32(a, tall), A)
    if not ok.all():
        out[~ok] = map_batch(polar_reference, A[~ok])
    return out
