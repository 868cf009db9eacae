"""Merge methods over whole state dicts, in one registry (registry.get, registry.all_methods)."""
# Registration order is the order methods() lists them in: baselines, SCORE, its SVD peers.
from . import elementwise, subspace, isotropic  # noqa: F401,I001  (registers the methods)
from .registry import MergeMethod, Option, all_methods, get

__all__ = ["MergeMethod", "Option", "all_methods", "get"]
