"""Entropy-adaptive online merging: the flat parameter arena and the merger built on it."""
from .arena import ParameterArena, Slot
from .merger import OnlineMerger, OnlineResult

__all__ = ["OnlineMerger", "OnlineResult", "ParameterArena", "Slot"]
