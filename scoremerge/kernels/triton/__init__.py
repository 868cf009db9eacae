"""Triton kernels and their launchers, one file per op. Importing this package does not import
triton; the kernel modules do, on first use (so that TRITON_INTERPRET, read when a kernel is
defined, can still be set by then)."""
import importlib.util
import os


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
