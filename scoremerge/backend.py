"""Backend choice (DESIGN.md): SCOREMERGE_BACKEND or backend= is auto | cuda | triton | torch.

`auto` takes the fastest backend that can run the op on the device and falls back quietly;
a backend named explicitly that cannot run raises BackendUnavailableError saying why.
"""
import os

from .errors import BackendUnavailableError, MergeInputError

BACKENDS = ("auto", "cuda", "triton", "torch")


def requested(backend):
    """The backend asked for: the argument, else SCOREMERGE_BACKEND, else auto."""
    name = backend if backend not in (None, "auto") else os.environ.get("SCOREMERGE_BACKEND", "auto")
    if name not in BACKENDS:
        raise MergeInputError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def resolve(op, backend, device, available):
    """Pick the backend for `op` on `device`.

    available: dict backend -> None if it can run, else the reason it cannot. Ops list only the
    backends that implement them; `torch` is always there.
    """
    name = requested(backend)
    if name != "auto":
        reason = available.get(name, f"scoremerge has no {name} implementation of {op} yet")
        if reason is not None:
            raise BackendUnavailableError(f"backend {name!r} cannot run {op} on {device}: {reason}")
        return name
    for name in ("cuda", "triton", "torch"):
        if name in available and available[name] is None:
            return name
    return "torch"
