"""The errors scoremerge raises on purpose; each message names what is wrong."""
import reprlib


class MergeInputError(ValueError):
    """Bad input: a missing or extra key, a shape mismatch, NaN/Inf, an unknown method or option,
    too few experts, an unreadable file. Raised before anything is computed or written."""


class BackendUnavailableError(RuntimeError):
    """A backend the caller named explicitly cannot run here (no GPU, not built, no kernel)."""



def _repr_limits():
    r = reprlib.Repr()     # attributes, not arguments: Python 3.10 and 3.11 take none
    r.maxlevel, r.maxstring, r.maxother, r.maxlong = 2, 80, 80, 40
    r.maxtuple = r.maxlist = r.maxdict = r.maxset = 4
    return r


_SHOWN = _repr_limits()


def shown(value):
    """repr(value) cut to a line: messages quote what a user gave, never megabytes of it (and
    never walk all of a huge nested value to print it)."""
    return _SHOWN.repr(value)


def shown_path(path, limit=240):
    """A path for a message, its middle cut when it is longer than `limit` characters."""
    text = str(path)
    if len(text) <= limit:
        return text
    return f"{text[:limit // 2]}...({len(text)} characters)...{text[-limit // 3:]}"
