"""Entropy-adaptive online merging (issue 7). So far: the flat parameter arena."""
from .arena import ParameterArena, Slot

__all__ = ["ParameterArena", "Slot"]
