"""Loading an optional compiled module of the package (scoremerge._C, scoremerge._cpu)."""
import importlib


def load(name, abi, built_when):
    """(the module scoremerge.<name>, None) when it was built, imports and is at ABI `abi`,
    else (None, why not). built_when: how setup.py comes to build it, for the message."""
    try:
        module = importlib.import_module(f"scoremerge.{name}")
    except ModuleNotFoundError:
        return None, (f"the extension scoremerge.{name} was not built (setup.py builds it "
                      f"{built_when})")
    except ImportError as e:
        return None, f"the extension scoremerge.{name} does not import: {e}"
    if module.version() != abi:
        return None, (f"the extension scoremerge.{name} is a stale build (ABI {module.version()}, "
                      f"this scoremerge expects {abi}): reinstall")
    return module, None
