"""Read a state dict from a .safetensors file, a Hugging Face-style folder (single file or shards
with an index), or a .pt/.pth/.bin file (torch.load with weights_only=True)."""
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import MergeInputError

SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def load_state_dict(path):
    """{key: tensor} on the CPU from a file or folder; errors name the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise MergeInputError(f"{path}: no such file or folder")
    return _load_folder(path) if path.is_dir() else _load_file(path)


def _load_file(path):
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for bad headers and sizes
            raise MergeInputError(f"{path}: not a readable safetensors file (truncated or "
                                  f"corrupt?): {e}") from None
    if path.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises many types: unpickling, zip, EOF
            raise MergeInputError(f"{path}: not a readable torch checkpoint (truncated, corrupt, "
                                  f"or holding more than tensors?): {e}") from None
        return _as_state_dict(obj, path)
    raise MergeInputError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors, "
                          f"{', '.join(TORCH_SUFFIXES)}, or a folder")


def _as_state_dict(obj, path):
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise MergeInputError(f"{path}: expected a mapping of names to tensors, got "
                              f"{type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        hint = (" (a training checkpoint? pass the state dict it holds under "
                f"{not_tensors[0]!r})" if len(obj) < 10 else "")
        raise MergeInputError(f"{path}: entries that are not tensors: {not_tensors[:5]}{hint}")
    return obj


def _load_folder(folder):
    for name in INDEX_FILES:
        if (folder / name).is_file():
            return _load_sharded(folder / name)
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return _load_file(folder / name)
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise MergeInputError(f"{folder}: no checkpoint found: expected one of "
                          f"{', '.join(INDEX_FILES + SINGLE_FILES)}; the folder has {found}")


def _load_sharded(index_path):
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MergeInputError(f"{index_path}: not a readable index with a weight_map: {e}") from None
    by_shard = defaultdict(list)
    for key, shard in weight_map.items():
        by_shard[shard].append(key)
    out = {}
    for shard, keys in by_shard.items():
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise MergeInputError(f"{index_path}: shard {shard!r} (holding {keys[0]!r} and "
                                  f"{len(keys) - 1} more) is missing")
        tensors = _load_file(shard_path)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise MergeInputError(f"{shard_path}: the index places {len(missing)} key(s) here that "
                                  f"the shard lacks: {missing[:5]}")
        out.update((k, tensors[k]) for k in keys)
    return {k: out[k] for k in weight_map}
