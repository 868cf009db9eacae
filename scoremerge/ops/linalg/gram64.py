"""Truncated SVD and polar factor through float64 Gram matrices and a symmetric eigensolver.

Why not torch.linalg.svd: on CPU, a float64 eigh of the smaller side's Gram matrix plus two
products costs about 2/3 of one float32 gesdd call of the same matrix (measured: 768x768,
46 ms against 68 ms on 2 cores).

Why float64, and when not: a Gram matrix squares the condition number. With eigenvectors of the
float64 Gram matrix, a singular vector recovered as u_i = A v_i / s_i carries an error near
eps64 * s_1^3 / (s_i^2 * gap), where float32 SVD carries eps32 * s_1 / gap: the Gram route is
the more accurate one while kappa_i = s_1 / s_i stays below about sqrt(eps32 / eps64) ~ 2e4.
Items past _MAX_KAPPA (rank-deficient layers such as an all-zero task matrix, or polar factors of
experts that share a subspace almost exactly) are recomputed by torch.linalg.svd in the caller's
dtype, so every item is at least as accurate as the plain-torch reference.
"""
import torch

from ...parallel import map_batch
from .gram import gram

_MAX_KAPPA = 1e4


def _eigh_descending(G, eigh):
    w, Q = eigh(G)
    return w.flip(-1).clamp_min(0), Q.flip(-1)


def _truncated_svd_gram(X, k, eigh):
    """Top-k triplets of float64 X [b, m, n], m >= n, as (U, s, V), and a per-item "redo" flag
    (NaN eigenvalues, an eigensolver's "did not converge", fail the test and are redone too)."""
    w, Q = _eigh_descending(gram(X), eigh)
    s = w[..., :k].sqrt()
    V = Q[..., :k]
    ok = s[..., -1] * _MAX_KAPPA > s[..., 0]
    U = (X @ V) / torch.where(ok[..., None, None], s[..., None, :], 1.0)
    return U, s, V, ~ok


def truncated_svd(A, k, eigh=torch.linalg.eigh):
    """Top-k singular triplets of A [b, m, n] by the float64 Gram route, whatever A's dtype and
    device: U [b, m, k], S [b, k], Vh [b, k, n] in A's dtype, values descending, signs as the
    eigensolver left them. eigh: the batched symmetric eigensolver (ascending values, vectors as
    columns), torch's by default, cuSOLVER's on the cuda backend (cuda.py)."""
    tall = A.shape[-2] >= A.shape[-1]
    X = A if tall else A.mT
    P, s, Q, redo = map_batch(lambda x: _truncated_svd_gram(x, k, eigh), X.double())
    if redo.any():
        U, S, Vh = torch.linalg.svd(X[redo], full_matrices=False)
        P[redo], s[redo], Q[redo] = (t.double() for t in (U[..., :k], S[..., :k], Vh[..., :k, :].mT))
    U, Vh = (P, Q.mT) if tall else (Q, P.mT)
    return U.to(A.dtype), s.to(A.dtype), Vh.to(A.dtype)


def _polar_gram(X, eigh):
    """Polar factor of float64 X [b, m, n], m >= n, and a per-item "redo" flag."""
    w, Q = _eigh_descending(gram(X), eigh)
    ok = w[..., -1] * _MAX_KAPPA**2 > w[..., 0]
    inv_sqrt = torch.where(ok[..., None], w, 1.0).rsqrt()
    return X @ ((Q * inv_sqrt[..., None, :]) @ Q.mT), ~ok


def polar(A, eigh=torch.linalg.eigh):
    """Orthogonal polar factor of A [b, m, n] (thin SVD A = P S Q -> P Q) by the float64 Gram
    route, in A's dtype, whatever its device; eigh as truncated_svd's."""
    tall = A.shape[-2] >= A.shape[-1]
    X = A if tall else A.mT
    out, redo = map_batch(lambda x: _polar_gram(x, eigh), X.double())
    if redo.any():
        P, _, Q = torch.linalg.svd(X[redo], full_matrices=False)
        out[redo] = (P @ Q).double()
    return (out if tall else out.mT).to(A.dtype)
