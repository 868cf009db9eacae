"""Merge methods over whole state dicts, in one registry (registry.get, registry.all_methods)."""
from . import elementwise, isotropic, subspace  # noqa: F401  (registers the methods)
from .registry import MergeMethod, Option, all_methods, get

__all__ = ["MergeMethod", "Option", "all_methods", "get"]
