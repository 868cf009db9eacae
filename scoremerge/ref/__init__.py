"""Plain-torch references: literal, readable, the ground truth for tests and benchmarks.

Imports only torch. Per op (linalg, projection, mixing, entropy) and per method as per-key loops
(methods).
"""
from . import entropy, linalg, methods, mixing, projection
from .linalg import canonical_signs, polar, truncated_svd
from .methods import merge_task_vectors
from .projection import project_and_mask, reconstruct

__all__ = ["entropy", "linalg", "methods", "mixing", "projection", "canonical_signs", "polar",
           "truncated_svd", "merge_task_vectors", "project_and_mask", "reconstruct"]
