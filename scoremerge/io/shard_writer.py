"""A safetensors file written piece by piece: the header first (every key's dtype, shape and offsets
are known from the plan), then each tensor's bytes at its offset as soon as it exists, so a
shard is never held in memory whole. Readable by the safetensors library like any other file.
How the bytes reach the disk is direct_writes.py's business."""
import json
import os
from pathlib import Path

import torch

from .atomic import give_plain_file_mode
from .direct_writes import DirectWrites
from .safetensors_format import DTYPE_NAMES


class ShardWriter:
    """Write `layout` ({key: (dtype, shape)}, in file order) to `path` under a temporary name;
    put(key, tensor) in any order; finish() fsyncs and renames it into place, only when every
    key has been put. abort() removes the temporary file."""

    def __init__(self, path, layout, metadata):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        header, offset = {}, 0
        self.spans = {}
        for key, (dtype, shape) in layout.items():
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}
            self.spans[key] = (offset, nbytes, dtype, tuple(shape))
            offset += nbytes
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}   # io.write sorts it
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)                 # the format aligns the data to 8 bytes
        self.data_start = 8 + len(blob)
        self.size = self.data_start + offset
        self.left = {key: span[1] for key, span in self.spans.items()}    # bytes not yet put
        # never through a link planted in a build folder left behind by an earlier run
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(self.fd, self.size)
            self.writes = DirectWrites(self.fd, self.size)
            self.writes.write(len(blob).to_bytes(8, "little") + blob, 0)
        except BaseException:
            self.abort()
            raise

    def put(self, key, tensor, start=None):
        """Write `tensor` as key's value; with start, as its entries from `start` on (a 1-D
        tensor of some of them, in row-major order)."""
        offset, nbytes, dtype, shape = self.spans[key]
        if tensor.dtype != dtype or (tuple(tensor.shape) != shape if start is None
                                     else tensor.dim() != 1
                                     or (start + tensor.numel()) * dtype.itemsize > nbytes):
            raise ValueError(f"{key}: planned {dtype} {shape}, got {tensor.dtype} "
                             f"{tuple(tensor.shape)} at entry {start or 0}")
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        at = self.data_start + offset + (start or 0) * dtype.itemsize
        self.writes.write(memoryview(raw), at)
        self.left[key] -= raw.nbytes

    def finish(self):
        missing = [key for key, left in self.left.items() if left]
        if missing:
            raise RuntimeError(f"{self.path.name}: {len(missing)} key(s) not wholly written, "
                               f"e.g. {sorted(missing)[:3]}")
        self.writes.finish()
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        give_plain_file_mode(self.tmp)
        os.replace(self.tmp, self.path)

    def abort(self):
        self.writes = None                              # and its bounce buffer
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)
