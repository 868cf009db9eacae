"""Write a merged model as safetensors into a folder, sharded with an index above a size limit.

The in-memory and the streaming merge share all of it: shard planning and names, the metadata
(sorted, so the same merge gives the same bytes), the index, the side files, and the folder
built hidden beside the target and renamed into place, under the output lock (io.access says
what may be written and replaced).
"""
import json
import re
import shutil
from pathlib import Path

import torch

from .._version import __version__
from ..errors import MergeInputError, shown
from .access import (FILES_KEY, INDEX_NAME, MARKER_KEY, check_output, check_replaceable,
                     copy_side_file, output_lock)
from .atomic import make_temp_dir, replace_folder, write_file_atomically
from .safetensors_format import DTYPE_NAMES
from .shard_writer import ShardWriter

DEFAULT_MAX_SHARD_SIZE = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size):
    """Bytes from an int or a string such as '500MB', '5GB' or '1.5GiB'."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size)[:100])
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise MergeInputError(f"size {shown(size)} is not a positive size such as 500MB, 5GB "
                              "or 2GiB")
    return max(1, int(float(match.group(1)) * _UNITS[match.group(2).upper()]))


def check_writable(out_dir, overwrite=False, inputs=()):
    """Raise before any work when out_dir may not be written: it is, holds or lies inside one
    of `inputs`, or holds something and overwrite is off (or it is not a merge's output)."""
    check_output(out_dir, inputs)
    check_replaceable(out_dir, overwrite)


def output_metadata(metadata, shards, side_files):
    """The metadata every written file carries: scoremerge's marker and version, the names of
    every file the merge writes (what a later --overwrite may replace), the rest sorted by key
    (str to str)."""
    names = [*shards, *([INDEX_NAME] if len(shards) > 1 else []),
             *(_side_name(item) for item in side_files)]
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return {"format": "pt", MARKER_KEY: __version__, FILES_KEY: json.dumps(sorted(names)),
            **dict(sorted(meta.items()))}


def settings_metadata(method, options, weights, alpha, exclude, base, experts):
    """A merge's settings as its output files record them, for output_metadata."""
    return {"method": method, "options": json.dumps(options, sort_keys=True), "alpha": alpha,
            **({} if weights is None else {"weights": json.dumps(weights)}),
            "exclude": json.dumps(list(exclude)), "base": base,
            "experts": json.dumps([str(e) for e in experts])}


def _side_name(item):
    return item[0] if isinstance(item, tuple) else Path(item).name


def plan_shards(sizes, limit):
    """{shard file name: [keys]} from (key, nbytes) pairs in file order, cut where a shard would
    pass `limit` bytes (a larger single key gets a shard of its own)."""
    shards, size = [[]], 0
    for key, nbytes in sizes:
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return dict(zip(shard_names(len(shards)), shards))


def shard_names(n):
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_index(folder, shards, total_size, meta):
    """model.safetensors.index.json for more than one shard."""
    if len(shards) < 2:
        return
    index = {"metadata": {"total_size": total_size, **meta},
             "weight_map": {k: name for name, keys in shards.items() for k in keys}}
    write_file_atomically(Path(folder) / INDEX_NAME,
                          lambda p: Path(p).write_text(json.dumps(index, indent=2)))


def copy_side_files(folder, side_files):
    """Copy (name, real path) pairs, or plain paths a caller chose, into `folder`."""
    for item in side_files:
        name, real = item if isinstance(item, tuple) else (_side_name(item), Path(item).resolve())
        (Path(folder) / name).unlink(missing_ok=True)      # left by an interrupted finish
        copy_side_file(real, Path(folder) / name)


def save_state_dict(state_dict, out_dir, *, metadata=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                    overwrite=False, extra_files=(), inputs=()):
    """Write {key: tensor} to the folder out_dir: model.safetensors, or model-0000i-of-0000n
    shards plus model.safetensors.index.json when larger than max_shard_size. metadata (str to
    str) goes into every shard's header and the index, with the scoremerge version. extra_files
    (paths, or (name, path) pairs from io.access.side_files) are copied in beside the weights.
    inputs: files and folders the merge read, which out_dir may not be, hold or lie in."""
    out_dir = Path(out_dir)
    check_output(out_dir, inputs)
    with output_lock(out_dir):
        return write_folder(state_dict, out_dir, metadata=metadata, max_shard_size=max_shard_size,
                            overwrite=overwrite, extra_files=extra_files)


def write_folder(state_dict, out_dir, *, metadata=None, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                 overwrite=False, extra_files=()):
    """save_state_dict for a caller that holds the output lock."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite)
    tensors = _tensors(state_dict)
    shards = plan_shards(((k, _nbytes(t)) for k, t in tensors.items()), parse_size(max_shard_size))
    meta = output_metadata(metadata, shards, extra_files)
    tmp = make_temp_dir(out_dir)
    try:
        for name, keys in shards.items():
            writer = ShardWriter(tmp / name, {k: (tensors[k].dtype, tensors[k].shape)
                                              for k in keys}, meta)
            try:
                for key in keys:
                    writer.put(key, tensors[key])
                writer.finish()
            except BaseException:
                writer.abort()
                raise
        write_index(tmp, shards, sum(_nbytes(t) for t in tensors.values()), meta)
        copy_side_files(tmp, extra_files)
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _tensors(state_dict):
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise MergeInputError(f"key {shown(key)} is a {type(t).__name__}, not a tensor")
        if t.dtype not in DTYPE_NAMES:
            raise MergeInputError(f"key {shown(key)} is {t.dtype}, which safetensors cannot hold")
    return dict(state_dict)


def _nbytes(t):
    return t.numel() * t.element_size()
