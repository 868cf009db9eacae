"""scoremerge: fast, verified model merging: SCORE and the SVD-based methods it is compared
with, over state dicts, with a plain-torch reference for every op and method.

    import scoremerge
    merged = scoremerge.merge(base, [expert1, expert2, expert3], method="score")
"""
from . import ops, ref
from ._version import __version__
from .api import merge, merge_task_vectors, methods, task_vectors
from .errors import BackendUnavailableError, MergeInputError
from .online import OnlineMerger

__all__ = ["merge", "merge_task_vectors", "methods", "task_vectors", "OnlineMerger", "ops", "ref",
           "MergeInputError", "BackendUnavailableError", "__version__"]
