"""A checkpoint opened for reading: a .safetensors or .pt/.pth/.bin file, or a Hugging Face-style
folder (one weights file, or shards with an index).

Which weights a folder holds is decided once, here, for every reader: the first of
WEIGHT_FILES present, transformers' own order, so a folder holding both safetensors and
pickled weights is read as safetensors by the in-memory and the streaming merge alike.

Every file is opened once and read through that descriptor with positioned reads (no memory
map: pages of a mapping that have been read stay resident while it is open, so a streaming merge
over mapped shards would grow towards the size of every model it reads). Its identity (inode,
size, modification and change times) is recorded on opening: check_unchanged() names a file
rewritten in place or replaced since, and fingerprint() adds each safetensors header's hash for
a resumed merge to compare.
"""
import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import MergeInputError, shown, shown_path
from .access import member
from .safetensors_format import read_header

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
MAX_INDEX_BYTES = 64 * 2**20


class Checkpoint:
    """.format: "safetensors" or "torch"; .files: the real paths read, in order; for
    safetensors, .infos {key: TensorInfo} in the checkpoint's order and .metadata. Use as a
    context manager, or call close()."""

    def __init__(self, path):
        self.path = Path(path)
        self._fds = []
        try:
            self.format, self.files, self.index, self._weight_map = _layout(self.path)
            for f in self.files:
                self._fds.append(os.open(f, os.O_RDONLY | os.O_CLOEXEC))
            self._opened = [file_identity(os.fstat(fd)) for fd in self._fds]
            if self.format == "safetensors":
                self._read_headers(self._weight_map)
                if not self.infos:
                    raise MergeInputError(f"{shown_path(self.path)}: holds no tensors")
        except OSError as e:
            self.close()
            raise MergeInputError(f"{shown_path(e.filename or self.path)}: cannot read: "
                                  f"{e.strerror}") from None
        except BaseException:
            self.close()
            raise

    def _read_headers(self, weight_map):
        self.infos, self.metadata, self._file_of, self._header_digests = {}, {}, {}, []
        headers = []
        for i, (fd, path) in enumerate(zip(self._fds, self.files)):
            with os.fdopen(os.dup(fd), "rb") as f:
                infos, metadata, raw = read_header(f, self._opened[i][1], path)
            headers.append(infos)
            self._header_digests.append(hashlib.sha256(raw).hexdigest())
            if weight_map is None:
                self.metadata = metadata
        if weight_map is None:
            self.infos = dict(headers[0])
            self._file_of = dict.fromkeys(self.infos, 0)
            return
        self.infos, self._file_of = _match_index(self.index, weight_map, self.files, headers)

    def read(self, key, start=None, stop=None, out=None):
        """The tensor `key` (safetensors), read from disk into new memory, or into `out` (a
        contiguous tensor of its dtype and shape); with start and stop, only its entries
        [start, stop) in row-major order, as a 1-D tensor."""
        info = self.infos[key]
        shape = info.shape if start is None else (stop - start,)
        if out is None:
            out = torch.empty(shape, dtype=info.dtype)
        elif out.dtype != info.dtype or tuple(out.shape) != tuple(shape) \
                or not out.is_contiguous():
            raise ValueError(f"{key}: read into a contiguous {info.dtype} {tuple(shape)}, got "
                             f"{out.dtype} {tuple(out.shape)}")
        offset = info.offset + (start or 0) * info.dtype.itemsize
        nbytes = out.numel() * info.dtype.itemsize
        if nbytes:
            view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
            got = os.preadv(self._fds[self._file_of[key]], [view], offset)
            if got != nbytes:
                raise MergeInputError(f"{self.files[self._file_of[key]]}: short read at byte "
                                      f"{offset} ({got} of {nbytes}): was the file truncated "
                                      "while merging?")
        return out

    def load(self):
        """The whole state dict {key: tensor} on the CPU."""
        if self.format == "safetensors":
            return {key: self.read(key) for key in self.infos}
        out = {}
        for fd, path in zip(self._fds, self.files):
            out.update(_torch_load(fd, path))
        if not out:
            raise MergeInputError(f"{shown_path(self.path)}: holds no tensors")
        return out if self._weight_map is None else _select(out, self.index, self._weight_map)

    def same_files(self, other):
        """Whether `other` reads the very files this one does, as the same tensors (one
        checkpoint named twice, as in mergekit's linear without a base_model): one read then
        serves both."""
        def files(checkpoint):
            return [(os.fstat(fd).st_dev, *opened)
                    for fd, opened in zip(checkpoint._fds, checkpoint._opened)]
        return files(self) == files(other) and self.infos == other.infos \
            and self._file_of == other._file_of

    def check_unchanged(self):
        """Raise naming a file that was rewritten in place or replaced since it was opened."""
        for fd, path, opened in zip(self._fds, self.files, self._opened):
            now = file_identity(os.fstat(fd))
            try:
                named = os.stat(path).st_ino
            except OSError:
                named = None
            if now != opened or named != opened[0]:
                how = "rewritten" if now != opened else "replaced or removed"
                raise MergeInputError(f"{path}: {how} while it was being read; merge again "
                                      "once the inputs stay put")

    def fingerprint(self):
        """What must not change for a resumed merge to reuse shards: every file's path and
        identity (a change time cannot be set back), the headers' and the index's hashes."""
        files = [[str(p), *ident] for p, ident in zip(self.files, self._opened)]
        index = None if self.index is None else hashlib.sha256(self.index.read_bytes()).hexdigest()
        return {"files": files, "headers": getattr(self, "_header_digests", []), "index": index}

    def close(self):
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def file_identity(st):
    """What changes whenever a file's content does: its inode, size, and modification and change
    times (nothing can set a change time back, short of the system clock)."""
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def layout_format(path):
    """"safetensors" or "torch": what the checkpoint at `path` holds (errors as Checkpoint's)."""
    return _layout(Path(path))[0]


def _layout(path):
    """(format, real paths of the weight files, index path or None, weight map or None)."""
    if not path.exists():
        raise MergeInputError(f"{path}: no such file or folder")
    if path.is_file():
        return _file_format(path), [path], None, None
    for name in WEIGHT_FILES:
        if os.path.lexists(path / name):
            real = member(path, name, "weights file")
            if not real.is_file():
                raise MergeInputError(f"{path / name}: a broken link")
            fmt = "safetensors" if name.startswith("model.safetensors") else "torch"
            if not name.endswith(".index.json"):
                return fmt, [real], None, None
            weight_map = _read_index(real, path / name, fmt)
            files = [_shard(path, path / name, s, weight_map)
                     for s in dict.fromkeys(weight_map.values())]
            return fmt, files, real, weight_map
    found = sorted(p.name for p in path.iterdir())[:10]
    raise MergeInputError(f"{path}: no checkpoint found: expected one of "
                          f"{', '.join(WEIGHT_FILES)}; the folder has {found}")


def _file_format(path):
    if path.suffix == ".safetensors":
        return "safetensors"
    if path.suffix in TORCH_SUFFIXES:
        return "torch"
    raise MergeInputError(f"{path}: unknown checkpoint type {path.suffix!r}; expected "
                          f".safetensors, {', '.join(TORCH_SUFFIXES)}, or a folder")


def _read_index(real, named, fmt):
    """The weight map {key: shard file name} of an index file, every name a plain file name of
    the checkpoint's format."""
    suffix = ".safetensors" if fmt == "safetensors" else ".bin"
    try:
        if real.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError(f"larger than {MAX_INDEX_BYTES >> 20} MiB")
        weight_map = json.loads(real.read_bytes())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        what = "no weight_map" if isinstance(e, (KeyError, TypeError)) else \
            "nested too deeply" if isinstance(e, RecursionError) else shown(str(e))
        raise MergeInputError(f"{named}: not a readable index with a weight_map: {what}") \
            from None
    if not isinstance(weight_map, dict):
        raise MergeInputError(f"{named}: weight_map must map tensor names to shard files, got "
                              f"a {type(weight_map).__name__}")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(suffix):
            raise MergeInputError(f"{named}: weight_map places {shown(key)} in {shown(shard)}, "
                                  f"not a {suffix} file name")
    return weight_map


def _shard(folder, index, shard, weight_map):
    real = member(folder, shard, f"shard named by {index.name}")
    if not real.is_file():
        keys = [k for k, s in weight_map.items() if s == shard]
        raise MergeInputError(f"{index}: shard {shown(shard)} (holding {shown(keys[0])} and "
                              f"{len(keys) - 1} more) is missing")
    return real


def _match_index(index, weight_map, files, headers):
    """Every key the index lists is in the shard it names; the shards hold no other key."""
    position = {}
    for i, shard in enumerate(dict.fromkeys(weight_map.values())):
        position[shard] = i
    infos, file_of = {}, {}
    for key, shard in weight_map.items():
        i = position[shard]
        if key not in headers[i]:
            raise MergeInputError(f"{index}: places {shown(key)} in {shard}, which does not "
                                  "hold it")
        infos[key], file_of[key] = headers[i][key], i
    unindexed = [k for i, h in enumerate(headers) for k in h if file_of.get(k) != i]
    if unindexed:
        raise MergeInputError(f"{index}: the shards hold key(s) the index does not list: "
                              f"{[shown(k) for k in unindexed[:5]]}")
    return infos, file_of


def _torch_load(fd, path):
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types: unpickling, zip, EOF
        raise MergeInputError(f"{path}: not a readable torch checkpoint (truncated, corrupt, "
                              f"or holding more than tensors?): {shown(str(e))}") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise MergeInputError(f"{path}: expected a mapping of names to tensors, got "
                              f"{type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        hint = (" (a training checkpoint? pass the state dict it holds under "
                f"{shown(not_tensors[0])})" if len(obj) < 10 else "")
        raise MergeInputError(f"{path}: entries that are not tensors: "
                              f"{[shown(k) for k in not_tensors[:5]]}{hint}")
    return obj


def _select(tensors, index, weight_map):
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise MergeInputError(f"{index}: lists key(s) its shards lack: "
                              f"{[shown(k) for k in missing[:5]]}")
    return {k: tensors[k] for k in weight_map}
