"""run_demo: check what the demo needs, run the experiment, print the table, write the files."""
import importlib.util
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from .._version import __version__
from ..errors import MergeInputError
from .checkpoints import default_cache_dir
from .experiment import run_experiment
from .report import format_table, plot, write_json

_NEEDS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def check_requirements(device):
    """Fail before any training: missing packages or an unusable device."""
    missing = [pkg for mod, pkg in _NEEDS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise MergeInputError(f"the demo needs {' and '.join(missing)}: "
                              "pip install 'scoremerge[demo]'")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MergeInputError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1)") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeInputError(f"--device {device}: torch sees no CUDA device here")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise MergeInputError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                              "device(s) here")
    if dev.type not in ("cpu", "cuda"):
        raise MergeInputError(f"--device {device}: the demo runs on cpu or cuda")


def run_demo(config, out="runs/demo", cache_dir="default", retrain=False, log=print, command=None):
    """Run the benchmark for `config` (demo_config(...)); print the table; write results.json and
    accuracy.png under `out`. cache_dir: trained models ("default": ~/.cache/scoremerge/demo;
    None: train in memory, cache nothing). command: recorded in results.json. Returns the results
    dict."""
    check_requirements(config.device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MergeInputError(f"--out {out}: exists and is not a folder")
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    results = run_experiment(config, cache, retrain, log)
    results["environment"] = {**_environment(config.device), "command": command}
    out.mkdir(parents=True, exist_ok=True)
    write_json(results, out / "results.json")
    plot(results, out / "accuracy.png")
    log(format_table(results))
    log(f"total {results['seconds']:.1f} s (training {results['training']['seconds']:.1f} s); "
        f"wrote {out / 'results.json'} and {out / 'accuracy.png'}")
    return results


def _environment(device):
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    return {"scoremerge": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": name, "torch_threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
