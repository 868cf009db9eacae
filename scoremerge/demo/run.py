"""run_demo: check what the demo needs, run the experiment, print the table, write the files."""
import dataclasses
import importlib.util
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import api
from .._version import __version__
from ..doctor.environment import cpu_description
from ..errors import MergeInputError
from .checkpoints import default_cache_dir
from .experiment import run_experiment
from .report import format_online_table, format_table, plot, plot_online, write_json
from .seeds import summarise

_NEEDS = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


class _DefaultCache:
    """run_demo's default cache_dir: default_cache_dir(), resolved when called."""

    def __repr__(self):
        return "~/.cache/scoremerge/demo"


DEFAULT_CACHE = _DefaultCache()


def check_requirements(config):
    """Fail before any training: missing packages, an unusable device, or a merge backend that
    cannot run there (probed with a tiny merge, so the error is the backend's own)."""
    missing = [pkg for mod, pkg in _NEEDS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise MergeInputError(f"the demo needs {' and '.join(missing)}: "
                              "pip install 'scoremerge[demo]'")
    try:
        dev = torch.device(config.device)
    except RuntimeError:
        raise MergeInputError(f"--device {config.device!r} is not a torch device (cpu, cuda, "
                              "cuda:1)") from None
    if dev.type not in ("cpu", "cuda"):
        raise MergeInputError(f"--device {config.device}: the demo runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeInputError(f"--device {config.device}: torch sees no CUDA device here")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise MergeInputError(f"--device {config.device}: only {torch.cuda.device_count()} CUDA "
                              "device(s) here")
    probe = [{"w": torch.randn(6, 5, generator=torch.Generator().manual_seed(t))} for t in (0, 1)]
    api.merge_task_vectors(probe, "score", backend=config.backend, device=dev)


def _ready_folder(path, flag):
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MergeInputError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MergeInputError(f"{flag} {path}: cannot create the folder: {e}") from None
    return path


def run_demo(config, out="runs/demo", cache_dir=DEFAULT_CACHE, retrain=False, log=print,
             command=None, seeds=1):
    """Run the benchmark for `config` (demo_config(...)); print the tables; write results.json,
    accuracy.png and online.png under `out`. cache_dir: a folder for the trained models (default:
    ~/.cache/scoremerge/demo), or None to train in memory and cache nothing. command: recorded
    in results.json. seeds: run seeds config.seed .. config.seed + seeds - 1 and report the mean
    and spread of every accuracy (results.json then holds each run and the summary). Returns the
    results dict."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise MergeInputError(f"--seeds must be a whole number >= 1, got {seeds!r}")
    check_requirements(config)
    cache = default_cache_dir() if cache_dir is DEFAULT_CACHE else cache_dir
    if cache is not None and Path(cache).exists() and not Path(cache).is_dir():
        raise MergeInputError(f"--cache {cache}: exists and is not a folder")
    out = _ready_folder(out, "--out")
    runs = [run_experiment(dataclasses.replace(config, seed=config.seed + i), cache, retrain, log)
            for i in range(seeds)]
    if seeds == 1:
        results, shown, spread = runs[0], runs[0], None
    else:
        shown, spread = summarise(runs)
        results = {"seeds": [r["config"]["seed"] for r in runs], "summary": shown,
                   "spread": spread, "runs": runs,
                   "seconds": sum(r["seconds"] for r in runs),
                   "training": {"seconds": sum(r["training"]["seconds"] for r in runs)}}
    results["environment"] = {**_environment(config.device), "command": command}
    write_json(results, out / "results.json")
    plot(shown, out / "accuracy.png", spread)
    plot_online(shown, out / "online.png", spread)
    log(format_table(shown, spread))
    log(format_online_table(shown["online"], None if spread is None else spread["online"]))
    log(f"total {results['seconds']:.1f} s (training {results['training']['seconds']:.1f} s); "
        f"wrote {out / 'results.json'}, {out / 'accuracy.png'} and {out / 'online.png'}")
    return results


def _environment(device):
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_description()
    return {"scoremerge": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": name, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
