"""Backend choice (DESIGN.md): SCOREMERGE_BACKEND or backend= is auto | cuda | triton | torch.

`auto` takes the fastest backend that implements the op and can run on the device (Triton only
on a GPU: its CPU interpreter is for tests), and falls back quietly. A backend named explicitly
must be able to run on the device, or BackendUnavailableError says why; it is then used for every
op it implements, and ops it does not implement yet take auto's choice (so backend="triton" runs
SCORE's projection and reconstruction in Triton and its SVDs in torch until those have kernels).
A backend may implement an op for some inputs only (the CUDA mix has no kernel mixing float64
with other dtypes): then, named, it raises; under auto, the next backend takes those inputs.
"""
import os

from .errors import BackendUnavailableError, MergeInputError
from .kernels import cuda as cuda_kernels
from .kernels import triton as triton_kernels

BACKENDS = ("auto", "cuda", "triton", "torch")
_PREFERENCE = ("cuda", "triton", "torch")


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
        return triton_kernels.unavailable_reason(device)
    return cuda_kernels.unavailable_reason(device)


def resolve(op, backend, device, implemented, unsupported=None):
    """The backend that runs `op` on `device`; implemented: the backends with a kernel for op;
    unsupported: {backend: why} for those of them without a kernel for these particular inputs."""
    unsupported = unsupported or {}
    name = requested(backend)
    if name != "auto":
        reason = unavailable_reason(name, device) or unsupported.get(name)
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run {op} on {device}: {reason}")
        if name in implemented:
            return name
    for name in _PREFERENCE:
        if name in implemented and name not in unsupported \
                and (name != "triton" or device.type == "cuda") \
                and unavailable_reason(name, device) is None:
            return name
    return "torch"
