"""The safetensors format, checked as strictly as the reference implementation checks it.

A file is 8 bytes of little-endian header length N, N bytes of a JSON object, then the data.
The object maps each tensor name to {"dtype", "shape", "data_offsets": [start, end]} (offsets
relative to the data) and may hold "__metadata__", a mapping of strings to strings. A file is
accepted only when every tensor's span is exactly its shape times its dtype's size and the
spans, in offset order, tile the data from its first byte to the file's last, with no gap,
overlap or alias: then no read can leave the file or see another tensor's bytes.

One parser for every reader in scoremerge (the in-memory load, the streaming merge, the checks
before resume); it raises MergeInputError, never another exception, whatever the bytes.
"""
import json
import math
import struct
from dataclasses import dataclass

import torch

from ..errors import MergeInputError, shown

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
          "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000          # the reference implementation's limit
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: `offset` is of its first byte in the file."""
    dtype: torch.dtype
    shape: tuple
    offset: int
    nbytes: int


def read_header(f, size, name):
    """({key: TensorInfo} in the header's order, {str: str} metadata, the raw header bytes) of
    the open binary file `f` of `size` bytes; `name` is how messages call it."""
    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise _bad(name, f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise _bad(name, f"header length {n} does not fit a {size}-byte file (truncated or "
                         "corrupt?)")
    raw = f.read(n)
    if len(raw) != n:
        raise _bad(name, "truncated while its header was read")
    infos, metadata = parse_header(raw, size, name)
    return infos, metadata, raw


def parse_header(raw, size, name):
    """({key: TensorInfo}, metadata) from the header bytes `raw` of a `size`-byte file."""
    header = _json_object(raw, name)
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict) or \
            not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(name, f"__metadata__ must map strings to strings, got {shown(metadata)}")
    data_start = 8 + len(raw)
    infos = {key: _entry(key, entry, data_start, name) for key, entry in header.items()}
    _check_tiling(infos, data_start, size, name)
    return infos, metadata


def _json_object(raw, name):
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise _bad(name, "its header is not UTF-8 (truncated or corrupt?)") from None
    except (ValueError, RecursionError) as e:   # RecursionError: nesting deeper than Python's
        what = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply" \
            if isinstance(e, RecursionError) else str(e)
        raise _bad(name, f"its header is not a JSON object (truncated or corrupt?): "
                         f"{shown(what)}") from None
    if not isinstance(header, dict):
        raise _bad(name, f"its header is a JSON {type(header).__name__}, not an object")
    return header


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {shown(dup)} appears twice")
    return out


def _entry(key, entry, data_start, name):
    where = f"tensor {shown(key)}"
    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        raise _bad(name, f"{where}: an entry must hold exactly dtype, shape and data_offsets, "
                         f"got {shown(entry)}")
    dtype = DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise _bad(name, f"{where}: unknown dtype {shown(entry['dtype'])} (known: "
                         f"{', '.join(DTYPES)})")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not _ints(shape) or any(d < 0 for d in shape) or not _product_fits(shape):
        raise _bad(name, f"{where}: shape must be a list of non-negative integers whose "
                         f"running product fits 64 bits, got {shown(shape)}")
    if not _ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise _bad(name, f"{where}: data_offsets must be two integers [start, end] with 0 <= "
                         f"start <= end, got {shown(offsets)}")
    needed = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != needed:
        raise _bad(name, f"{where} spans {offsets[1] - offsets[0]} bytes, its shape and dtype "
                         f"need {needed}")
    return TensorInfo(dtype, tuple(shape), data_start + offsets[0], needed)


def _product_fits(shape):
    """Every partial product of the dimensions, in order, below 2^63: the reference multiplies
    with overflow checks, so a [2^40, 2^40, 0] tensor is refused though it holds nothing."""
    product = 1
    for d in shape:
        product *= d
        if product >= 2**63:
            return False
    return True


def _ints(value):
    # bool is an int to Python; JSON's true is not an offset
    return isinstance(value, list) and all(type(v) is int for v in value)


def _check_tiling(infos, data_start, size, name):
    """The spans, in offset order, must cover the data exactly: each starts where the last
    ended (zero-byte tensors may share a position), the last ends at the file's end."""
    at = data_start
    for key, info in sorted(infos.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
        if info.offset != at:
            problem = "overlaps the tensor before it" if info.offset < at else \
                f"leaves a gap of {info.offset - at} bytes before it"
            raise _bad(name, f"tensor {shown(key)} {problem} (its data starts at byte "
                             f"{info.offset}, the previous ends at {at})")
        at += info.nbytes
    if at != size:
        raise _bad(name, f"truncated: the header's tensors end at byte {at}, the file has {size}"
                   if at > size else f"{size - at} bytes after the last tensor that no header "
                                     "entry describes")


def _bad(name, problem):
    return MergeInputError(f"{name}: not a readable safetensors file: {problem}")
