"""The errors scoremerge raises on purpose; each message names what is wrong."""


class MergeInputError(ValueError):
    """Bad input: a missing or extra key, a shape mismatch, NaN/Inf, an unknown method or option,
    too few experts, an unreadable file. Raised before anything is computed or written."""


class BackendUnavailableError(RuntimeError):
    """A backend the caller named explicitly cannot run here (no GPU, not built, no kernel)."""
