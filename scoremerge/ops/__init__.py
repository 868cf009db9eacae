"""Primitive ops: each checks its inputs and dispatches to a backend (DESIGN.md)."""
from .entropy_weights import entropy_weights
from .mix import mix
from .polar import polar
from .project_and_mask import project_and_mask
from .reconstruct import reconstruct
from .truncated_svd import truncated_svd

__all__ = ["entropy_weights", "mix", "polar", "project_and_mask", "reconstruct", "truncated_svd"]
