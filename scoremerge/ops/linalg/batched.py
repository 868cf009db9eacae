"""The torch backend of truncated_svd and polar: its entry points, which pick the route.

float32 on a CPU (min(m, n) >= cpu_float32._MIN_SIZE) takes cpu_float32.py's float32 Gram
eigensolver with refinement; everything else the float64 Gram route of gram64.py. Both fall back
on SVD for the items outside their guards.
"""
from . import cpu_float32, gram64


def truncated_svd(A, k):
    """Top-k singular triplets of A [b, m, n]: U [b, m, k], S [b, k], Vh [b, k, n] in A's dtype,
    values descending, signs as the eigensolver left them."""
    route = cpu_float32 if cpu_float32.applies(A) else gram64
    return route.truncated_svd(A, k)


def polar(A):
    """Orthogonal polar factor of A [b, m, n] in A's dtype (thin SVD A = P S Q -> P Q)."""
    route = cpu_float32 if cpu_float32.applies(A) else gram64
    return route.polar(A)
