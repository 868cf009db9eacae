"""The Triton backend's availability and its launch lock. The kernels are ops/<op>/triton.py,
which import triton; this module does not, and the ops import those modules on first use only
(so that TRITON_INTERPRET, read when a kernel is defined, can still be set by then)."""
import contextlib
import importlib.util
import os
import threading

_INTERPRETER_LOCK = threading.Lock()


def launch_guard():
    """Held around every kernel launch: Triton's CPU interpreter keeps global state while it runs
    a kernel and is not thread-safe (the CPU merge path runs key groups on threads). Compiled
    launches need no lock."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _INTERPRETER_LOCK
    return contextlib.nullcontext()


def unavailable_reason(device):
    """None when Triton kernels can run on `device`, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"Triton kernels run on CUDA devices, or on the CPU through the interpreter "
            f"(TRITON_INTERPRET=1 set before triton is imported); got {device}")
