"""Write a state dict as safetensors, sharded with an index above a size limit, atomically.

Everything is written into a temporary folder beside the target and renamed into place at the
end, so a failure or an interruption leaves no partial output under the target's name.
"""
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..errors import MergeInputError
from .atomic import give_plain_file_mode, make_temp_dir

INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size):
    """Bytes from an int or a string such as '500MB', '5GB' or '1.5GiB'."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise MergeInputError(f"size {size!r} is not a positive size such as 500MB, 5GB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def check_writable(out_dir, overwrite=False):
    """Raise before any work when out_dir holds something and overwrite is off."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeInputError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise MergeInputError(f"{out_dir}: folder exists and is not empty (pass overwrite / "
                              "--overwrite to replace it)")


def save_state_dict(state_dict, out_dir, *, metadata=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                    overwrite=False, extra_files=()):
    """Write {key: tensor} to the folder out_dir: model.safetensors, or model-0000i-of-0000n
    shards plus model.safetensors.index.json when larger than max_shard_size. metadata (str to
    str) goes into every shard's header and the index, with the scoremerge version. extra_files
    (paths) are copied in beside the weights (a base model's config and tokenizer files)."""
    out_dir = Path(out_dir)
    check_writable(out_dir, overwrite)
    limit = parse_size(max_shard_size)
    meta = {"format": "pt", "scoremerge_version": __version__,
            **{str(k): str(v) for k, v in (metadata or {}).items()}}
    tensors = _detached(state_dict)
    shards = _plan_shards(tensors, limit)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir)
    try:
        names = shard_names(len(shards))
        for name, keys in zip(names, shards):
            save_file({k: tensors[k] for k in keys}, tmp / name, metadata=meta)
            give_plain_file_mode(tmp / name)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values()), **meta},
                     "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _detached(state_dict):
    """Contiguous CPU tensors, none sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise MergeInputError(f"key {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _nbytes(t):
    return t.numel() * t.element_size()


def _plan_shards(tensors, limit):
    shards, size = [[]], 0
    for key, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += _nbytes(t)
    return shards


def shard_names(n):
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def replace_folder(tmp, out_dir):
    """Rename tmp to out_dir; an existing out_dir is moved aside first, removed after."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, aside / "old")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(aside / "old", out_dir)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
