"""The CUDA backend of truncated_svd and polar: the float64 Gram route of gram64.py
with its eigensolver swapped for cuSOLVER's batched one (csrc/eigh.cu), one call per batch.

The Gram products are cuBLAS DGEMMs through torch (the H200 runs float64 products on its tensor
cores); the eigen-decompositions are where torch loses time on a GPU: torch.linalg.eigh batches
only up to 32x32 and loops one matrix at a time above that. This path needs the built extension
(there is no kernel source for CuPy to compile: it is a library call) and a cuSOLVER with
cusolverDnXsyevBatched (CUDA 12.6 update 2 or newer), found in the process at run time
(backend/cuda.py: eigensolver_unavailable).
"""
import contextlib

import torch

from ...backend import cuda as cuda_backend
from . import gram64

_DTYPES = {torch.float64: "float64", torch.float32: "float32"}


def eigh(G):
    """Ascending eigenvalues [b, n] and eigenvectors [b, n, n] (columns) of symmetric G [b, n, n]
    (float64 or float32, on a CUDA device), like torch.linalg.eigh; items the solver did not
    converge on come back with NaN eigenvalues, which the Gram route treats as "redo by SVD"."""
    ext = cuda_backend.extension()[0]
    b, n, _ = G.shape
    dtype = _DTYPES[G.dtype]
    vectors = G.contiguous().clone()                     # overwritten in place by the solver
    values = torch.empty(b, n, dtype=G.dtype, device=G.device)
    info = torch.empty(b, dtype=torch.int32, device=G.device)
    # A CPU tensor only ever meets a stand-in extension (the tests' emulated solver).
    on_gpu = G.device.type == "cuda"
    with torch.cuda.device(G.device) if on_gpu else contextlib.nullcontext():
        work_bytes, _ = ext.eigh_workspace(dtype, n, b)
        work = torch.empty(max(work_bytes, 1), dtype=torch.uint8, device=G.device)
        stream = torch.cuda.current_stream(G.device).cuda_stream if on_gpu else 0
        failed = ext.eigh_batched(dtype, n, b, vectors.data_ptr(), values.data_ptr(),
                                  info.data_ptr(), work.data_ptr(), work_bytes, stream)
    if failed:
        values[failed] = float("nan")
    # column-major eigenvectors: row j of the row-major buffer is eigenvector j
    return values, vectors.mT


def truncated_svd(A, k):
    """See gram64.truncated_svd; A [b, m, n] on a CUDA device."""
    return gram64.truncated_svd(A, k, eigh=eigh)


def polar(A):
    """See gram64.polar; A [b, m, n] on a CUDA device."""
    return gram64.polar(A, eigh=eigh)
