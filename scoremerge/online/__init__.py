"""Entropy-adaptive online merging: the flat parameter arena, the merger built on it, and the
calibration records that make the experts' entropies comparable."""
from .arena import ParameterArena, Slot
from .calibration import calibration_record, matched_temperature
from .merger import OnlineMerger, OnlineResult

__all__ = ["OnlineMerger", "OnlineResult", "ParameterArena", "Slot", "calibration_record",
           "matched_temperature"]
