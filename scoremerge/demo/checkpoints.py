"""The demo's trained models, cached on disk: train on first use, load afterwards.

The cache key hashes everything that determines the weights (seed, model and schedules, angles,
the data split, torch and scoremerge versions), so a changed setting never reuses stale weights.
Each model is written atomically (scoremerge.io's writer), so an interrupted run leaves complete
models or none; a missing or unreadable one is retrained.
"""
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from .._version import __version__
from ..errors import MergeInputError
from ..io import load_state_dict, save_state_dict
from .train import finetune, pretrain

_CACHE_FORMAT = 1


def default_cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "scoremerge" / "demo"


def cache_key(settings):
    """A short hash of the JSON-able dict of everything that determines the trained weights."""
    blob = json.dumps({"format": _CACHE_FORMAT, "scoremerge": __version__,
                       "torch": torch.__version__.split("+")[0], **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def trained_models(config, upright, domains, cache_dir, retrain=False, log=print):
    """(base, {angle: expert}, info): info holds seconds spent training and what came from cache.
    With cache_dir None nothing is read or written."""
    folder = None if cache_dir is None else Path(cache_dir) / cache_key(config.training_settings())
    info = {"cache": str(folder) if folder else None, "trained": [], "loaded": [], "seconds": 0.0}

    def get(name, train):
        if folder is not None and not retrain and (folder / name).is_dir():
            try:
                state = load_state_dict(folder / name)
                info["loaded"].append(name)
                return state
            except MergeInputError as e:
                log(f"cached {name} unreadable, retraining: {e}")
        start = time.perf_counter()
        state = train()
        info["seconds"] += time.perf_counter() - start
        info["trained"].append(name)
        if folder is not None:
            save_state_dict(state, folder / name, overwrite=True, metadata={"demo_model": name})
        return state

    base = get("base", lambda: pretrain(config.vit, upright, config.base_schedule, config.seed))
    experts = {}
    for d in domains:
        experts[d.angle] = get(f"expert-{d.angle}", lambda d=d: finetune(
            config.vit, base, d.train, config.expert_schedule, config.seed * 1000 + d.angle + 1))
    if info["trained"]:
        log(f"trained {', '.join(info['trained'])} in {info['seconds']:.1f} s"
            + (f" (cached in {folder})" if folder else ""))
    return base, experts, info
