"""The CUDA backend's availability: the extension scoremerge._C where setup.py built it (nvcc
present at install), else CuPy's runtime compiler (NVRTC) over the same csrc/ headers. Neither is
imported until a kernel or an availability answer is needed, so scoremerge imports on a machine
without a GPU, nvcc or CuPy. The kernels themselves are in ops/mixing/cuda.py (the mix, either
path) and ops/linalg/cuda.py (cuSOLVER's batched eigensolver, the extension only).
"""
import functools
import importlib
import re
from pathlib import Path

import torch

from .extension import load

ABI_VERSION = 2                     # csrc/bindings.cu's ABI_VERSION: a stale _C is not used
_PACKAGE = Path(__file__).resolve().parents[1]
# An installed wheel carries the headers in the package (setup.py's build_py); a source or
# editable checkout has them at the repository root.
SOURCE_DIRS = (_PACKAGE / "_csrc", _PACKAGE.parent / "csrc")


@functools.cache
def source(name="mix.cuh"):
    """The text of a csrc/ header, from the package or the checkout."""
    for folder in SOURCE_DIRS:
        if (folder / name).is_file():
            return (folder / name).read_text()
    raise FileNotFoundError(f"{name} is in none of {[str(d) for d in SOURCE_DIRS]}")


@functools.cache
def header_constant(name):
    """A `constexpr int NAME = value;` of mix.cuh: the CuPy path's block length and block size
    come from the source it compiles, as the extension's come from the source it was built with."""
    found = re.search(rf"constexpr int {name} = (\d+);", source())
    if found is None:
        raise ValueError(f"mix.cuh defines no constexpr int {name}")
    return int(found.group(1))


@functools.cache
def extension():
    """(scoremerge._C, None) when it was built and imports, else (None, why not)."""
    return load("_C", ABI_VERSION, "when nvcc is on PATH at install")


@functools.cache
def route(device_index):
    """("extension" or "cupy", None) for the path that runs on cuda:device_index, else
    (None, why neither can)."""
    ext, why_not = extension()
    if ext is not None:
        with torch.cuda.device(device_index):
            error = ext.kernel_error()
        if not error:
            return "extension", None
        why_not = f"the extension scoremerge._C cannot run on cuda:{device_index} ({error})"
    try:
        importlib.import_module("cupy")
    except ImportError as e:
        return None, (f"{why_not}, and CuPy, which would compile the kernels at run time, does "
                      f"not import ({e}; pip install cupy-cuda13x, or cupy-cuda12x)")
    try:
        source()
    except FileNotFoundError as e:
        return None, f"{why_not}, and CuPy has no kernel source to compile: {e}"
    return "cupy", None


def unavailable_reason(device):
    """None when the CUDA kernels can run on `device`, else why not."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"CUDA kernels run on CUDA devices; got {device}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    return route(device_index(device))[1]


@functools.cache
def eigensolver_unavailable(device_index):
    """None when cuSOLVER's batched eigensolver (ops/linalg/cuda.py) runs on cuda:device_index
    through the extension, else why not."""
    ext, why_not = extension()
    if ext is None:
        return why_not
    # torch may load cuSOLVER lazily; one small eigh makes sure the process holds the copy torch
    # uses before the extension looks for it (and decides once).
    torch.linalg.eigh(torch.eye(2, dtype=torch.float64, device=f"cuda:{device_index}"))
    with torch.cuda.device(device_index):
        error = ext.eigh_error() or ext.kernel_error()
    return f"cuSOLVER's batched eigensolver is unavailable: {error}" if error else None


def device_index(device):
    return device.index if device.index is not None else torch.cuda.current_device()
