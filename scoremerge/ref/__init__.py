"""Plain-torch references: literal, readable, the ground truth for tests and benchmarks.

Per op family, the naive.py beside each op (ops/<family>/naive.py): linalg, projection, mixing,
entropy; per method, a per-key loop (ref/methods.py). They import torch and one another only, so
they stay literal whatever the fast paths become.
"""
from ..ops.entropy import naive as entropy
from ..ops.linalg import naive as linalg
from ..ops.mixing import naive as mixing
from ..ops.projection import naive as projection
from . import methods
from .methods import merge_task_vectors

canonical_signs, polar, truncated_svd = linalg.canonical_signs, linalg.polar, linalg.truncated_svd
project_and_mask, reconstruct = projection.project_and_mask, projection.reconstruct

__all__ = ["entropy", "linalg", "methods", "mixing", "projection", "canonical_signs", "polar",
           "truncated_svd", "merge_task_vectors", "project_and_mask", "reconstruct"]
