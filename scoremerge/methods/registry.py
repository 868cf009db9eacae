"""The one registry of merge methods.

A method is registered with `@merge_method(...)`, which checks at import that the name is new,
that the function's keyword-only parameters are exactly its declared options with the declared
defaults, and that the reference function (scoremerge.ref) takes the same options.
"""
import difflib
import inspect
import math
from dataclasses import dataclass, field

from ..errors import MergeInputError, shown

_REGISTRY = {}


@dataclass(frozen=True)
class Option:
    """One option of a method: default, and either the allowed choices or a numeric range."""
    name: str
    default: object
    help: str
    choices: tuple = ()
    low: float = None       # inclusive unless low_open
    high: float = None      # inclusive
    low_open: bool = False
    per_model: bool = False     # also takes one value per expert (a list of T values)

    def parse(self, value, method):
        """Convert (from CLI strings too) and validate; raise MergeInputError naming the option."""
        kind = type(self.default)
        try:
            if kind is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("true", "1", "yes")
            elif (kind is bool) != isinstance(value, bool):    # `density: true` is a mistake
                raise ValueError(value)
            else:
                value = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise MergeInputError(f"option {self.name!r} of method {method!r} takes a "
                                  f"{kind.__name__}, got {shown(value)}") from None
        if kind is float and not math.isfinite(value):
            raise MergeInputError(f"option {self.name!r} of method {method!r} must be a finite "
                                  f"number, got {value}")
        if self.choices and value not in self.choices:
            raise MergeInputError(f"option {self.name!r} of method {method!r} must be one of "
                                  f"{', '.join(map(repr, self.choices))}; got {shown(value)}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high:
            lo = "(" if self.low_open else "["
            raise MergeInputError(f"option {self.name!r} of method {method!r} must be in "
                                  f"{lo}{self.low}, {self.high}]; got {value!r}")
        return value


@dataclass(frozen=True)
class MergeMethod:
    """A registered method. kind: "matrix" (2-D keys batched by shape, others take the mean) or
    "elementwise" (one rule for every key, all keys at once). entrywise: an elementwise method
    whose merged entry depends only on the same entry of the task vectors, so keys may be
    merged alone and in chunks (methods.entrywise). weighted: the method takes the per-expert
    weights itself (`weights=`, a [T] tensor or None) instead of receiving task vectors already
    scaled by them. on_models: the method merges the experts' weights, not task vectors (the
    base only names the keys). couples_keys: options -> None when each key merges on its own
    under those options, else why not (a streaming or per-key merge then cannot run it).
    on_task_sum: a matrix method that reads the task matrices only through their sum, so it
    may be given that sum as [B, 1, m, n] in place of [B, T, m, n]. in_spans: for a method that
    merges a key entry by entry once a pass over the whole key has ranked it (TIES per tensor),
    how: applies(options), rank(...) and merge(...) (elementwise._TiesInSpans), so a streaming
    merge can cut a key larger than its budget into spans."""
    name: str
    kind: str
    summary: str
    paper: str
    fn: object = field(repr=False)
    reference: object = field(repr=False)
    options: tuple = ()
    min_tasks: int = 1
    entrywise: bool = False
    weighted: bool = False
    on_models: bool = False
    couples_keys: object = field(default=None, repr=False)
    on_task_sum: bool = False
    in_spans: object = field(default=None, repr=False)

    def coupling(self, options):
        """None when every key merges independently of the others under `options` (parsed),
        else why not."""
        return self.couples_keys(options) if self.couples_keys else None

    @property
    def defaults(self):
        return {o.name: o.default for o in self.options}

    def parse_options(self, options, n_tasks=None):
        """Defaults overlaid with `options`, each validated; unknown names get a suggestion. A
        per-model option may be a list of one value per expert (n_tasks of them, when known);
        it comes back as a tuple."""
        known = {o.name: o for o in self.options}
        for name in options:
            if name not in known:
                hint = difflib.get_close_matches(str(name)[:100], known, n=1)
                hint = f"; did you mean {hint[0]!r}?" if hint else ""
                choices = ", ".join(known) if known else "none"
                raise MergeInputError(f"unknown option {shown(name)} for method {self.name!r} "
                                      f"(its options: {choices}){hint}")
        return {n: (_parse(o, options[n], self.name, n_tasks) if n in options else o.default)
                for n, o in known.items()}


def _parse(option, value, method, n_tasks):
    if option.per_model and isinstance(value, str) and "," in value:
        value = value.split(",")           # the command line's density=0.5,0.3,0.7
    if not option.per_model or not isinstance(value, (list, tuple)):
        return option.parse(value, method)
    if not value or (n_tasks is not None and len(value) != n_tasks):
        wanted = f"{n_tasks} values, one per expert" if n_tasks else "one value per expert"
        raise MergeInputError(f"option {option.name!r} of method {method!r} takes one value or "
                              f"{wanted}; got {len(value)}")
    return tuple(option.parse(v, method) for v in value)


def _keyword_defaults(fn):
    """A function's keyword-only options; `backend` is how the batched ones pick their ops and
    `weights` how a weighted method gets the per-expert weights."""
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("backend", "weights")}


def merge_method(name, *, kind, summary, paper, reference, options=(), min_tasks=1,
                 entrywise=False, weighted=False, on_models=False, couples_keys=None,
                 on_task_sum=False, in_spans=None):
    """Register the decorated function as method `name`."""
    if kind not in ("matrix", "elementwise"):
        raise ValueError(f"method {name!r}: kind must be 'matrix' or 'elementwise', got {kind!r}")
    if entrywise and kind != "elementwise":
        raise ValueError(f"method {name!r}: only an elementwise method can be entrywise")
    if on_task_sum and kind != "matrix":
        raise ValueError(f"method {name!r}: only a matrix method reads the task sum")
    if in_spans and (kind != "elementwise" or entrywise):
        raise ValueError(f"method {name!r}: only an elementwise method that is not entrywise "
                         "merges in spans after a ranking")

    def register(fn):
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is registered twice")
        declared = {o.name: o.default for o in options}
        for impl in (fn, reference):
            if _keyword_defaults(impl) != declared:
                raise TypeError(f"method {name!r}: {impl.__module__}.{impl.__qualname__} takes "
                                f"keyword options {_keyword_defaults(impl)}, declared {declared}")
        _REGISTRY[name] = MergeMethod(name, kind, summary, paper, fn, reference, tuple(options),
                                      min_tasks, entrywise, weighted, on_models, couples_keys,
                                      on_task_sum, in_spans)
        return fn
    return register


def get(name):
    """The method called `name`; an unknown name raises with the closest registered one."""
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(str(name)[:100], _REGISTRY, n=1)
        hint = f"; did you mean {hint[0]!r}?" if hint else ""
        raise MergeInputError(f"unknown method {shown(name)} (known: {', '.join(_REGISTRY)})"
                              f"{hint}")
    return _REGISTRY[name]


def all_methods():
    return dict(_REGISTRY)
