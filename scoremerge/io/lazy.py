"""Checkpoints read lazily: safetensors headers parsed once, tensors read one at a time with plain
positioned reads into fresh tensors.

Not memory-mapped on purpose: pages of a mapping that have been read stay in the process's
resident set while the file is open, so a streaming merge over mmap'd shards grows towards the
size of every model it reads; a positioned read costs one copy and leaves nothing behind.
"""
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergeInputError
from .read import INDEX_FILES

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class TensorInfo:
    path: Path
    dtype: torch.dtype
    shape: tuple
    offset: int          # of the first byte in the file
    nbytes: int


def read_header(path):
    """{key: TensorInfo} and the metadata dict of a safetensors file, checked against its size
    (a truncated file is named here, before anything is read or written)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise MergeInputError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                              f"{e}") from None
    metadata = header.pop("__metadata__", {}) or {}
    base = 8 + n
    infos = {}
    for key, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            start, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise MergeInputError(f"{path}: bad header entry for {key!r}: {entry!r}") from None
        nbytes = end - start
        expected = torch.Size(shape).numel() * dtype.itemsize
        if start < 0 or nbytes != expected:
            raise MergeInputError(f"{path}: {key!r} spans {nbytes} bytes, its shape and dtype "
                                  f"need {expected}")
        if base + end > size:
            raise MergeInputError(f"{path}: truncated: {key!r} ends at byte {base + end}, the "
                                  f"file has {size}")
        infos[key] = TensorInfo(path, dtype, shape, base + start, nbytes)
    return infos, metadata


def read_tensor(info):
    """The tensor `info` describes, read from disk into new memory."""
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.nbytes:
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        with open(info.path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [view], info.offset)
        if got != info.nbytes:
            raise MergeInputError(f"{info.path}: short read at byte {info.offset} ({got} of "
                                  f"{info.nbytes}): was the file truncated while merging?")
    return out


class LazyCheckpoint:
    """A .safetensors file or a Hugging Face-style folder (model.safetensors, or shards with
    model.safetensors.index.json), with every tensor's TensorInfo and nothing loaded.

    .infos: {key: TensorInfo} in the checkpoint's order; .shards: the files, in index order."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise MergeInputError(f"{self.path}: no such file or folder")
        if self.path.is_file():
            self.infos, self.metadata = read_header(self.path)
            self.shards = [self.path]
            return
        index = next((self.path / n for n in INDEX_FILES if (self.path / n).is_file()), None)
        if index is not None and index.name.endswith(".safetensors.index.json"):
            self._from_index(index)
        elif (self.path / "model.safetensors").is_file():
            self.infos, self.metadata = read_header(self.path / "model.safetensors")
            self.shards = [self.path / "model.safetensors"]
        else:
            raise MergeInputError(f"{self.path}: streaming reads safetensors checkpoints: "
                                  "expected model.safetensors or model.safetensors.index.json")

    def _from_index(self, index):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MergeInputError(f"{index}: not a readable index with a weight_map: {e}") from None
        headers = {}
        for shard in dict.fromkeys(weight_map.values()):
            path = self.path / shard
            if not path.is_file():
                raise MergeInputError(f"{index}: shard {shard!r} is missing")
            headers[shard] = read_header(path)[0]
        self.infos, self.metadata = {}, {}
        for key, shard in weight_map.items():
            if key not in headers[shard]:
                raise MergeInputError(f"{index}: places {key!r} in {shard}, which does not "
                                      "hold it")
            self.infos[key] = headers[shard][key]
        unindexed = [k for s, h in headers.items() for k in h if weight_map.get(k) != s]
        if unindexed:
            raise MergeInputError(f"{index}: the shards hold key(s) the index does not list: "
                                  f"{unindexed[:5]}")
        self.shards = [self.path / s for s in headers]

    def read(self, key):
        return read_tensor(self.infos[key])
