"""Backend choice (docs/architecture.md): SCOREMERGE_BACKEND or backend= is auto | cuda | triton | torch.

`auto` takes the fastest backend that implements the op and can run on the device (Triton only
on a GPU: its CPU interpreter is for tests), and falls back quietly. A backend named explicitly
must be able to run on the device, or BackendUnavailableError says why; it is then used for every
op it implements, and ops it does not implement yet take auto's choice (so backend="triton" runs
SCORE's projection and reconstruction in Triton and its SVDs in torch until those have kernels).
A backend may implement an op for some inputs only (the CUDA mix has no kernel mixing float64
with other dtypes): then, named, it raises; under auto, the next backend takes those inputs.

A kernel can also fail only when it runs: Triton or NVRTC cannot compile it for this GPU, the
driver is older than the toolkit, a library is missing. Under auto (`run`), that hands the op over
to the next backend for the rest of the process, with one warning; a named backend raises.
"""
import functools
import importlib
import os
import threading
import warnings

import torch

from ..errors import BackendUnavailableError, MergeInputError
from . import cuda as cuda_backend
from . import triton as triton_backend

BACKENDS = ("auto", "cuda", "triton", "torch")
_PREFERENCE = ("cuda", "triton", "torch")
# The backends with a kernel for each op: what resolve() chooses among and what doctor checks.
IMPLEMENTED = {"truncated_svd": ("cuda", "torch"), "polar": ("cuda", "torch"),
               "project_and_mask": ("triton", "torch"), "reconstruct": ("triton", "torch"),
               "mix": ("cuda", "triton", "torch"), "entropy_weights": ("torch",)}
_LINALG_OPS = ("truncated_svd", "polar")
# Errors that say the call was wrong, not the kernel's environment: another backend would be no
# better (or would hide a launcher bug), so auto does not fall back on them.
_NOT_A_KERNEL_FAILURE = (ValueError, TypeError)
_FAILED = {}                         # (op, backend, device) -> the error that ended its use
_FAILED_LOCK = threading.Lock()


class KernelFallbackWarning(RuntimeWarning):
    """Under auto, a kernel failed to compile or launch and the next backend took over."""


def requested(backend):
    """The backend asked for: the argument, else SCOREMERGE_BACKEND, else auto."""
    name = backend if backend not in (None, "auto") else os.environ.get("SCOREMERGE_BACKEND", "auto")
    if name not in BACKENDS:
        raise MergeInputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def unavailable_reason(name, device):
    """None when backend `name` can run on `device`, else why not."""
    if name == "torch":
        return None
    if name == "triton":
        return triton_backend.unavailable_reason(device)
    return cuda_backend.unavailable_reason(device)


def op_restriction(op, name, device):
    """Why backend `name`, able to run on `device`, still has no kernel for `op` there, or None.
    The CUDA SVD and polar factor need the built extension and cuSOLVER's batched eigensolver,
    where the CUDA mix also runs from CuPy."""
    if name == "cuda" and op in _LINALG_OPS and device.type == "cuda":
        return cuda_backend.eigensolver_unavailable(cuda_backend.device_index(device))
    return None


def why_not(op, name, device):
    """None when backend `name` runs `op` on `device` (for some inputs), else the reason resolve()
    gives, or the run-time failure that took it out of auto's choice in this process."""
    if name not in IMPLEMENTED[op]:
        return f"scoremerge has no {name} kernel for {op}"
    reason = unavailable_reason(name, device) or op_restriction(op, name, device)
    if reason is None and (op, name, str(device)) in _FAILED:
        reason = f"failed at run time in this process: {_FAILED[(op, name, str(device))]}"
    return reason


def resolve(op, backend, device, implemented=None, unsupported=None):
    """The backend that runs `op` on `device`; implemented: the backends with a kernel for op
    (default IMPLEMENTED[op]); unsupported: {backend: why} for those of them without a kernel
    for these particular inputs."""
    implemented = IMPLEMENTED[op] if implemented is None else implemented
    unsupported = unsupported or {}
    name = requested(backend)
    if name != "auto":
        reason = (unavailable_reason(name, device) or op_restriction(op, name, device)
                  or unsupported.get(name))
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run {op} on {device}: {reason}")
        if name in implemented:
            return name
    return _auto_choice(op, device, implemented, unsupported)


def _auto_choice(op, device, implemented, unsupported):
    for name in _PREFERENCE:
        if name in implemented and name not in unsupported \
                and (name != "triton" or device.type == "cuda") \
                and (op, name, str(device)) not in _FAILED \
                and unavailable_reason(name, device) is None \
                and op_restriction(op, name, device) is None:
            return name
    return "torch"


def run(op, backend, device, kernels, unsupported=None):
    """kernels[resolve(op, backend, device, ...)]() for kernels {backend: zero-argument call}.

    When auto chose the backend and its kernel fails to compile or launch, the op falls to the
    next backend, now and for the rest of the process, with one KernelFallbackWarning; the torch
    backend, a named backend and errors about the inputs themselves raise as they are."""
    if set(kernels) != set(IMPLEMENTED[op]):       # doctor checks what IMPLEMENTED lists
        raise RuntimeError(f"{op} dispatches to {sorted(kernels)}, but backend.IMPLEMENTED "
                           f"lists {IMPLEMENTED[op]}")
    name = resolve(op, backend, device, tuple(kernels), unsupported)
    if name == requested(backend):
        return kernels[name]()
    while True:
        try:
            return kernels[name]()
        except _NOT_A_KERNEL_FAILURE:
            raise
        except Exception as error:
            if name == "torch" or _is_out_of_memory(error):
                raise
            failed, why, first = name, _one_line(error), _record_failure(op, name, device, error)
        name = _auto_choice(op, device, tuple(kernels), unsupported or {})
        if first:
            warnings.warn(f"scoremerge: the {failed} kernel for {op} failed on {device} ({why}); "
                          f"{op} runs on the {name} backend from now on",
                          KernelFallbackWarning, stacklevel=3)


def _record_failure(op, name, device, error):
    """Takes the backend out of auto's choice for op on device; True the first time (two
    threads failing at once warn once)."""
    key = (op, name, str(device))
    with _FAILED_LOCK:
        first = key not in _FAILED
        _FAILED.setdefault(key, _one_line(error))
    return first


def _is_out_of_memory(error):
    """Out of device memory is no property of the kernel: torch's path would need more."""
    return isinstance(error, torch.cuda.OutOfMemoryError)


def _one_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def lazy(module):
    """A call returning `module`, imported on the first call. The ops reach their Triton kernels
    through it: importing triton defines the kernels, and TRITON_INTERPRET is read then, so the
    kernel modules must not be imported with scoremerge."""
    return functools.cache(lambda: importlib.import_module(module))
