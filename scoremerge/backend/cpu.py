"""The optional CPU extension scoremerge._cpu (csrc/cpu/): plain C++ that setup.py builds with
the machine's compiler. Not an op backend: it holds method-level helpers (TIES's exact-k ranking,
the fused entry-wise merges), each with a torch reference that the caller checks it against
before use. Imported on first need, so scoremerge imports without it.
"""
import functools

from .extension import load

ABI_VERSION = 3                     # csrc/cpu/cpu.h's ABI_VERSION: a stale _cpu is not used


@functools.cache
def extension():
    """(scoremerge._cpu, None) when it was built and imports at this ABI, else (None, why not)."""
    return load("_cpu", ABI_VERSION, "with a C++ compiler at install")
