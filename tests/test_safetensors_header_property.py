"""The one safetensors header parser, by property (issue 13): whatever the bytes (random ones,
mutations of a valid file, headers built from JSON strategies), read_header either returns
tensors that all lie inside the file's data, in disjoint spans of exactly shape x itemsize
bytes, or raises MergeInputError; never another exception."""
import io
import json
import math
import struct

import hypothesis.strategies as st
import torch
from hypothesis import HealthCheck, given, settings

from scoremerge.errors import MergeInputError
from scoremerge.io.safetensors_format import DTYPES, read_header

SETTINGS = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def parsed(data):
    """read_header's tensors, checked to lie inside `data`; None when it refused the bytes."""
    try:
        infos, metadata, raw = read_header(io.BytesIO(data), len(data), "x.safetensors")
    except MergeInputError as e:
        assert str(e).startswith("x.safetensors: ") and "\n" not in str(e)
        return None
    assert struct.unpack("<Q", data[:8])[0] == len(raw) and data[8:8 + len(raw)] == raw
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    start, size = 8 + len(raw), len(data)
    for key, info in infos.items():
        assert isinstance(key, str) and info.dtype in DTYPES.values()
        assert all(type(d) is int and d >= 0 for d in info.shape)
        assert info.nbytes == math.prod(info.shape) * info.dtype.itemsize
        assert start <= info.offset and info.offset + info.nbytes <= size, (key, info)
    spans = sorted((i.offset, i.offset + i.nbytes) for i in infos.values())
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert end <= begin, spans                       # no overlap, no alias
    covered = sum(i.nbytes for i in infos.values())
    assert covered == size - start                       # the data, exactly
    return infos


def file_of(header, data):
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


DTYPE_NAMES = sorted(DTYPES)
tensor_specs = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda k: k != "__metadata__"),
    st.tuples(st.sampled_from(DTYPE_NAMES), st.lists(st.integers(0, 4), max_size=3)),
    max_size=4)


@st.composite
def valid_files(draw):
    specs = draw(tensor_specs)
    header, at = {}, 0
    for key, (dtype, shape) in specs.items():
        n = math.prod(shape) * DTYPES[dtype].itemsize
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + n]}
        at += n
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5),
                                                      max_size=2))
    keys = list(header)
    order = draw(st.permutations(keys))                  # the header's order is free
    header = {k: header[k] for k in order}
    return file_of(header, draw(st.binary(min_size=at, max_size=at))), specs


@SETTINGS
@given(st.binary(max_size=400))
def test_any_bytes(data):
    parsed(data)


@SETTINGS
@given(st.binary(max_size=300), st.binary(max_size=64), st.integers(-8, 8))
def test_any_header_bytes_with_a_plausible_length(blob, data, skew):
    n = max(0, len(blob) + skew)
    parsed(struct.pack("<Q", n) + blob + data)


@SETTINGS
@given(valid_files())
def test_a_valid_file_parses_to_its_tensors(made):
    data, specs = made
    infos = parsed(data)
    assert infos is not None
    assert {k: (i.dtype, list(i.shape)) for k, i in infos.items()} == \
        {k: (DTYPES[d], s) for k, (d, s) in specs.items()}


@SETTINGS
@given(valid_files(), st.data())
def test_mutations_of_a_valid_file(made, draw):
    data = bytearray(made[0])
    how = draw.draw(st.sampled_from(["flip", "truncate", "append", "length", "splice"]))
    if how == "flip":
        for _ in range(draw.draw(st.integers(1, 4))):
            i = draw.draw(st.integers(0, len(data) - 1))
            data[i] ^= draw.draw(st.integers(1, 255))
    elif how == "truncate":
        data = data[:draw.draw(st.integers(0, len(data) - 1))]
    elif how == "append":
        data += draw.draw(st.binary(min_size=1, max_size=16))
    elif how == "length":
        data[:8] = struct.pack("<Q", draw.draw(st.one_of(st.integers(0, len(data) + 8),
                                                         st.integers(0, 2**64 - 1))))
    else:
        i = draw.draw(st.integers(8, len(data)))
        data[i:i] = draw.draw(st.binary(min_size=1, max_size=8))
    parsed(bytes(data))


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8)
small_or_huge = st.one_of(st.integers(-2, 40), st.sampled_from([2**31, 2**63 - 1, 2**63,
                                                                2**64, 2**70]))
entries = st.fixed_dictionaries(
    {"dtype": st.one_of(st.sampled_from(DTYPE_NAMES + ["F128", "f32", ""]), json_scalars),
     "shape": st.one_of(st.lists(small_or_huge, max_size=3), json_values),
     "data_offsets": st.one_of(st.lists(st.one_of(small_or_huge, json_scalars), max_size=3),
                               json_values)})
headers = st.dictionaries(
    st.text(max_size=5),
    st.one_of(entries, entries, json_values),
    max_size=4)


@SETTINGS
@given(headers, st.binary(max_size=120))
def test_headers_built_from_json_strategies(header, data):
    parsed(file_of(header, data))
    if header:                            # the same header padded to 8 bytes, as writers do
        blob = json.dumps(header).encode()
        parsed(file_of(blob + b" " * (-len(blob) % 8), data))


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(DTYPE_NAMES), st.lists(st.integers(0, 3), max_size=2),
                          st.integers(-4, 4)), min_size=1, max_size=4))
def test_offsets_nudged_off_their_places(specs):
    """Offsets off by a few bytes: overlaps, gaps, aliases, spans longer than the data."""
    header, at = {}, 0
    for i, (dtype, shape, nudge) in enumerate(specs):
        n = math.prod(shape) * DTYPES[dtype].itemsize
        header[f"t{i}"] = {"dtype": dtype, "shape": shape,
                           "data_offsets": [at + nudge, at + nudge + n]}
        at += n
    parsed(file_of(header, bytes(at)))


def test_the_shapes_it_accepts_are_tensors_torch_can_hold():
    """A cheap companion of the property: a file the parser accepts gives tensors torch can
    make (the bug in tests/test_hostile_headers.py's zero-element shapes is the exception)."""
    data = file_of({"a": {"dtype": "F32", "shape": [2, 0, 3], "data_offsets": [0, 0]},
                    "b": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}, bytes(6))
    infos = parsed(data)
    for info in infos.values():
        assert torch.empty(info.shape, dtype=info.dtype).numel() * info.dtype.itemsize \
            == info.nbytes
