"""scoremerge's methods inside mergekit 0.1.5 (`pip install mergekit==0.1.5`).

    from scoremerge.integrations.mergekit import register
    register()              # merge_method: score | tsv | iso_c | iso_cts | magmax in any YAML

or from the command line, `scoremerge mergekit CONFIG OUT [mergekit-yaml flags]`, which is
run_mergekit(): mergekit's own `mergekit-yaml` with these methods registered.

Each method takes `weight` per model (default 1.0), which scales that model's task vector
before the decomposition (tau_t -> weight_t * tau_t); `lambda` (default 1.0), scoremerge's alpha:
the output is base + lambda * merged; and the method's own options with scoremerge's defaults
(scoremerge.methods()[name].defaults, e.g. score's `variant`), as `parameters:`. A base model
is required. Compute is float32 or wider whatever mergekit's `dtype`; the result is cast to it.

Importing this package does not import mergekit; register() and run_mergekit() do, and raise
ModuleNotFoundError naming the install command when it is missing.
"""
import importlib
import sys

METHODS = ("score", "tsv", "iso_c", "iso_cts", "magmax")
MERGEKIT_VERSION = "0.1.5"
INSTALL = f"pip install mergekit=={MERGEKIT_VERSION}"


def _import(module):
    """A mergekit module, or ModuleNotFoundError saying how to install mergekit."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name not in ("mergekit", module):
            raise
        raise ModuleNotFoundError(
            f"scoremerge's mergekit integration needs mergekit: {INSTALL}",
            name="mergekit") from None


def register():
    """Add score, tsv, iso_c, iso_cts and magmax to mergekit's method registry. Idempotent:
    names already registered by this integration are kept; a name mergekit (or anything else)
    registered first is an error, never replaced. Returns the names."""
    registry = _import("mergekit.merge_methods")
    from .methods import ScoremergeMethod, mergekit_method

    taken = {m.spec.name: m for m in registry.registered_methods()}
    for name in METHODS:
        if name not in taken:
            registry.register(mergekit_method(name))
        elif not isinstance(taken[name], ScoremergeMethod):
            raise ValueError(f"mergekit already has a merge method named {name!r} that is not "
                             "scoremerge's; scoremerge's cannot be registered under that name")
    return METHODS


def run_mergekit(argv):
    """register(), then mergekit's `mergekit-yaml` command with argv (CONFIG OUT [flags]);
    returns its exit status (0 on success, 2 on a usage error, as click exits). Errors raised
    by the merge itself propagate, as from mergekit-yaml."""
    register()
    command = _import("mergekit.scripts.run_yaml").main
    try:
        command.main(args=list(argv), prog_name="scoremerge mergekit", standalone_mode=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


__all__ = ["METHODS", "register", "run_mergekit"]
