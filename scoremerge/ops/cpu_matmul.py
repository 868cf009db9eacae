"""Float32 matrix products on a CPU through the faster of the two GEMM libraries inside torch.

Why: torch multiplies float32 matrices on a CPU with MKL, and MKL runs its AVX2 kernels on a CPU
that is not Intel's. On the 2-core AMD EPYC (Zen 5, AVX-512) MKL's sgemm ran at about 90
GFLOP/s per thread and oneDNN's, behind torch's linear op, at 150-185 on the products of the SVD
routes (one thread, 3072 x 768 and 768 x 768 operands, conversions included, measured). On a
Zen 3 EPYC (AVX2 only) MKL was the faster, 10.2 ms against 13.6 for 768^3 (one thread, one-off),
and on an Intel CPU MKL runs its AVX-512 kernels already. So the library is chosen by
measurement, once per process: the first large float32 product times both on one 768^3 product
and takes oneDNN only where it is clearly faster and agrees with MKL. SCOREMERGE_CPU_MATMUL=mkl
or =onednn fixes the choice (the two round differently, so a fixed choice makes reruns repeat
bit for bit on a machine where the measured margin is narrow).

oneDNN accumulates in another order: its products' error against float64 was 1.5-2.2x MKL's
on the Zen 5 EPYC (3.7e-7..5.7e-7 against 2.5e-7, relative Frobenius), both within float32's
bound; the float32 route's error tests run with each library (tests/test_linalg_cpu.py), the
products' own in tests/test_cpu_matmul.py.
"""
import contextlib
import itertools
import os
import threading
import time

import torch

from ..errors import MergeInputError

LIBRARIES = ("mkl", "onednn")
ENVIRONMENT = "SCOREMERGE_CPU_MATMUL"
# Below this many multiply-adds (m k n) a product stays with torch: at 2^20 oneDNN lost as
# often as it won (256 x 32 x 512: 0.20 ms against MKL's 0.10), at 2^22 it took 0.5x-0.6x
# MKL's time (256^3, 512 x 64 x 512; one thread, measured).
_MIN_WORK = 1 << 22
# oneDNN's linear op is slow with few rows: 16 x 768 x 3072 took 3.2 ms against MKL's 1.7 (and
# 17 x 4001 x 3001 5x MKL's time), 128 rows 0.87x MKL's time, 256 rows 0.67x, where 3072 x 768
# x 16 took 0.5x (one thread, measured). So the longer of m and n is made its rows, and products
# whose longer side is shorter than this stay with MKL.
_MIN_ROWS = 256
# oneDNN is taken only when at least this much faster, so that timing noise on a CPU where the
# two are close does not flip the choice (and the results' rounding) between runs.
_MARGIN = 1.25

_lock = threading.Lock()
_chosen = None


def matmul(a, b):
    """a @ b for a [..., m, k] and b [..., k, n] with broadcast batch dims, as torch's; large
    float32 products on a CPU go through the chosen library."""
    if not _takes(a, b) or library() == "mkl":
        return a @ b
    return _onednn(a, b)


def library():
    """"mkl" or "onednn": the library large float32 CPU products use in this process."""
    global _chosen
    if _chosen is None:
        with _lock:
            if _chosen is None:
                _chosen = _choose()
    return _chosen


@contextlib.contextmanager
def using(name):
    """Products take library `name` inside the block, whatever this process chose: for
    benchmarks that time one library against the other in one process. Not for use while
    other threads multiply."""
    global _chosen
    if name not in LIBRARIES:
        raise ValueError(f"library {name!r}: expected one of {', '.join(LIBRARIES)}")
    if name == "onednn" and not _onednn_works():
        raise RuntimeError("this torch has no working oneDNN linear op on this CPU")
    before = library()
    _chosen = name
    try:
        yield
    finally:
        _chosen = before


def chosen_by():
    """A sentence for `scoremerge doctor`: which library, and why."""
    forced = os.environ.get(ENVIRONMENT)
    return f"{library()} ({ENVIRONMENT}={forced})" if forced else f"{library()} (measured)"


def _takes(a, b):
    if not (a.ndim >= 2 and b.ndim >= 2 and a.device.type == "cpu" and b.device.type == "cpu"
            and a.dtype == torch.float32 and b.dtype == torch.float32
            and not (a.requires_grad or b.requires_grad)):
        return False
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    return max(m, n) >= _MIN_ROWS and m * k * n >= _MIN_WORK


def _linear(x, w):
    """x [..., k] @ w [n, k]^T through oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(_dense(x), _dense(w), None, "none", [], "")


def _dense(t):
    """t, or a contiguous copy where t is neither contiguous nor a contiguous matrix's transpose:
    oneDNN runs both layouts at full speed but takes its reference loop for other strides (a
    sliced 768 x 500 weight: 72 s for what took 18 ms). Transposes are not copied: torch's
    transposing copy of a 3072 x 768 float32 matrix took 8-10 ms inside a batch, half a
    product with it (one thread, measured)."""
    if t.is_contiguous() or (t.ndim == 2 and t.mT.is_contiguous()):
        return t
    return t.contiguous()


def _product(a, b):
    """a [m, k] @ b [k, n] through oneDNN, the longer of m and n as the linear op's rows."""
    if a.shape[0] >= b.shape[1]:
        return _linear(a, b.mT)
    return _linear(b.mT, a).mT


def _onednn(a, b):
    """a @ b through oneDNN's linear op: one call when b is one matrix, else one per batch
    item, into one output."""
    if a.shape[-1] != b.shape[-2]:
        return a @ b                                 # torch's own message for the mismatch
    if b.ndim == 2:
        rows = a.reshape(-1, a.shape[-1])
        return _product(rows, b).contiguous().view(*a.shape[:-1], b.shape[-1])
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    out = a.new_empty(*batch, a.shape[-2], b.shape[-1])
    for index in itertools.product(*map(range, batch)):
        out[index] = _product(a[index], b[index])
    return out


def _choose():
    forced = os.environ.get(ENVIRONMENT)
    if forced is not None:
        if forced not in LIBRARIES:
            raise MergeInputError(f"{ENVIRONMENT}={forced!r}: expected one of "
                                  f"{', '.join(LIBRARIES)}")
        if forced == "onednn" and not _onednn_works():
            raise MergeInputError(f"{ENVIRONMENT}=onednn, but this torch has no working "
                                  "oneDNN linear op on this CPU")
        return forced
    if not _onednn_works():
        return "mkl"
    a, b = _operands(768)
    mkl, onednn = [], []
    for _ in range(3):                               # interleaved, best of three each
        mkl.append(_seconds(lambda: a @ b))
        onednn.append(_seconds(lambda: _onednn(a, b)))
    return "onednn" if _MARGIN * min(onednn) < min(mkl) else "mkl"


def _operands(n):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _onednn_works():
    """Whether oneDNN's linear op runs here and agrees with MKL on a small product."""
    if not torch.backends.mkldnn.is_available():
        return False
    a, b = _operands(96)
    try:
        got = _onednn(a, b)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    want = a @ b
    return got.shape == want.shape and bool(
        (got - want).norm() <= 1e-5 * want.norm())
