"""The demo's trained models, cached on disk: train on first use, load afterwards.

Training runs on the CPU with one intra-op thread per model (the experts in parallel, one per
core), so the weights depend on the seed and settings, not on the machine's thread count. The
cache key hashes everything that determines them: the settings, the source of the data, model and
training modules, and the torch and scoremerge versions; a change never reuses stale weights.
Each model is written atomically (scoremerge.io's writer); a missing or unreadable one is
retrained, and a cache that cannot be written costs the cache, not the run.
"""
import contextlib
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .._version import __version__
from ..errors import MergeInputError
from ..io import load_state_dict, save_state_dict
from . import data, model, train


def default_cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "scoremerge" / "demo"


def cache_key(settings):
    """A short hash of the JSON-able dict of everything that determines the trained weights."""
    sources = [Path(m.__file__).read_bytes() for m in (data, model, train)]
    blob = json.dumps({"scoremerge": __version__, "torch": torch.__version__.split("+")[0],
                       "code": [hashlib.sha256(s).hexdigest() for s in sources], **settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _one_thread_per_model():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def trained_models(config, upright, domains, cache_dir, retrain=False, log=print):
    """(base, {angle: expert}, info), CPU state dicts; info: where the cache is, which models
    were trained and which loaded, and the seconds spent training. cache_dir None: no cache."""
    folder = None if cache_dir is None else Path(cache_dir) / cache_key(config.training_settings())
    info = {"cache": str(folder) if folder else None, "trained": [], "loaded": [], "seconds": 0.0}

    def cached(name):
        if folder is None or retrain or not (folder / name).is_dir():
            return None
        try:
            state = load_state_dict(folder / name)
        except MergeInputError as e:
            log(f"cached {name} unreadable, retraining: {e}")
            return None
        info["loaded"].append(name)
        return state

    def store(name, state):
        info["trained"].append(name)
        if folder is None:
            return
        try:
            save_state_dict(state, folder / name, overwrite=True, metadata={"demo_model": name})
        except (OSError, MergeInputError) as e:
            log(f"could not cache {name} in {folder} (going on without): {e}")

    start = time.perf_counter()
    with _one_thread_per_model():
        base = cached("base")
        if base is None:
            base = train.pretrain(config.vit, upright, config.base_schedule, config.seed)
            store("base", base)
        experts = {d.angle: cached(f"expert-{d.angle}") for d in domains}
        todo = [d for d in domains if experts[d.angle] is None]
        if todo:
            with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool:
                states = pool.map(lambda d: train.finetune(config.vit, base, d.train,
                                                           config.expert_schedule,
                                                           config.seed * 1000 + d.angle + 1), todo)
                for d, state in zip(todo, states):
                    experts[d.angle] = state
                    store(f"expert-{d.angle}", state)
    info["seconds"] = time.perf_counter() - start if info["trained"] else 0.0
    if info["trained"]:
        log(f"trained {', '.join(info['trained'])} in {info['seconds']:.1f} s"
            + (f" (cached in {folder})" if folder else ""))
    return base, experts, info
