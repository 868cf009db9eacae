"""Hostile checkpoint files: header strictness, safetensors before pickled weights. See
tests/hostile.py for what every case checks."""

import json
import struct

import pytest
import torch

from scoremerge import MergeInputError
from scoremerge.io import load_state_dict
from scoremerge.io.checkpoint import Checkpoint
from scoremerge.streaming import merge_checkpoints

# ws is a fixture: pytest finds it by the name the tests take
from hostile import (INDEX, DTYPES_BY_NAME, PATH_ARGS, BOTH, raw_file, st_bytes, write_checkpoint,
                     snapshot, hidden_beside, assert_refused, same_values, ws)  # noqa: F401


# ------------------------------------------------------------------ 8. header strictness

A = torch.arange(4, dtype=torch.float32)
DATA = A.numpy().tobytes() + (A + 4).numpy().tobytes()         # a: bytes 0-16, b: 16-32


def ent(start, end, shape=(4,), dtype="F32"):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


def _header_cases():
    valid = raw_file({"a": ent(0, 16), "b": ent(16, 32)}, DATA)
    return {
        "overlap": raw_file({"a": ent(0, 16), "b": ent(8, 24)}, DATA[:24]),
        "alias": raw_file({"a": ent(0, 16), "b": ent(0, 16)}, DATA[:16]),
        "gap": raw_file({"a": ent(0, 16), "b": ent(20, 36)}, DATA + b"\0" * 4),
        "out_of_order_overlap": raw_file({"b": ent(16, 32), "a": ent(12, 28)}, DATA),
        "duplicate_key": raw_file(
            b'{"a":' + json.dumps(ent(0, 16)).encode() + b',"b":' + json.dumps(ent(16, 32))
            .encode() + b',"b":' + json.dumps(ent(16, 32)).encode() + b'}', DATA),
        "float_offsets": raw_file({"a": ent(0.0, 16.0), "b": ent(16, 32)}, DATA),
        "one_point_zero": raw_file(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16.0]},'
                                   b'"b":' + json.dumps(ent(16, 32)).encode() + b'}', DATA),
        "string_offsets": raw_file({"a": ent("0", "16"), "b": ent(16, 32)}, DATA),
        "bool_offsets": raw_file({"a": ent(False, 16), "b": ent(16, 32)}, DATA),
        "true_offset": raw_file({"a": {"dtype": "BOOL", "shape": [1], "data_offsets":
                                       [0, True]}, "b": ent(1, 17)}, b"\1" + DATA[:16]),
        "reversed_offsets": raw_file({"a": ent(16, 0), "b": ent(16, 32)}, DATA),
        "negative_offsets": raw_file({"a": ent(-16, 0), "b": ent(16, 32)}, DATA),
        "negative_shape": raw_file({"a": ent(0, 16, shape=(-4,)), "b": ent(16, 32)}, DATA),
        "negative_shapes_product": raw_file({"a": ent(0, 16, shape=(-2, -2)),
                                             "b": ent(16, 32)}, DATA),
        "overflowing_shape": raw_file({"a": ent(0, 16, shape=(2**70,)), "b": ent(16, 32)}, DATA),
        "overflowing_wrapping": raw_file({"a": ent(0, 16, shape=(2**62, 2**62 + 4)),
                                          "b": ent(16, 32)}, DATA),
        "float_shape": raw_file({"a": ent(0, 16, shape=(4.0,)), "b": ent(16, 32)}, DATA),
        "shape_mismatch": raw_file({"a": ent(0, 16, shape=(5,)), "b": ent(16, 32)}, DATA),
        "unknown_dtype": raw_file({"a": ent(0, 16, dtype="F128"), "b": ent(16, 32)}, DATA),
        "dtype_not_string": raw_file({"a": ent(0, 16, dtype=["F32"]), "b": ent(16, 32)}, DATA),
        "entry_not_object": raw_file({"a": [0, 16], "b": ent(16, 32)}, DATA),
        "list_header": raw_file(b"[]", DATA),
        "string_header": raw_file(b'"model"', DATA),
        "null_header": raw_file(b"null", DATA),
        "deeply_nested_list": raw_file(b"[" * 100_000, DATA),
        "deeply_nested_object": raw_file(b'{"a":' * 100_000, DATA),
        "not_json": raw_file(b"{not json", DATA),
        "nan_offsets": raw_file(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[NaN,16]},'
                                b'"b":' + json.dumps(ent(16, 32)).encode() + b'}', DATA),
        "infinite_shape": raw_file(b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":'
                                   b'[0,16]},"b":' + json.dumps(ent(16, 32)).encode() + b'}',
                                   DATA),
        "5000_digit_offset": raw_file(b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,'
                                      + b"9" * 5000 + b']},"b":'
                                      + json.dumps(ent(16, 32)).encode() + b'}', DATA),
        "not_utf8": raw_file(b'{"\xff\xfe": 1}', DATA),
        "header_longer_than_file": struct.pack("<Q", len(valid)) + valid[8:],
        "header_length_2_64": struct.pack("<Q", 2**64 - 1) + valid[8:],
        "shorter_than_8_bytes": b"\x10\x00\x00",
        "empty_file": b"",
        "truncated_data": valid[:-3],
        "trailing_bytes": valid + b"\0" * 8,
        "metadata_int_values": raw_file({"__metadata__": {"k": 1}, "a": ent(0, 16),
                                         "b": ent(16, 32)}, DATA),
        "metadata_list": raw_file({"__metadata__": ["k"], "a": ent(0, 16), "b": ent(16, 32)},
                                  DATA),
        "metadata_string": raw_file({"__metadata__": "k", "a": ent(0, 16), "b": ent(16, 32)},
                                    DATA),
        "metadata_nested": raw_file({"__metadata__": {"k": {"x": "y"}}, "a": ent(0, 16),
                                     "b": ent(16, 32)}, DATA),
    }


HEADER_CASES = _header_cases()

INDEX_CASES = {
    "weight_map_int": {"weight_map": 5},
    "weight_map_list": {"weight_map": ["a", "b"]},
    "weight_map_string": {"weight_map": "model.safetensors"},
    "weight_map_null": {"weight_map": None},
    "weight_map_values_int": {"weight_map": {"a": 1, "b": 1}},
    "weight_map_values_list": {"weight_map": {"a": ["s.safetensors"], "b": "s.safetensors"}},
    "weight_map_not_safetensors": {"weight_map": {"a": "s.bin", "b": "s.bin"}},
    "no_weight_map": {"metadata": {}},
    "index_list": [1, 2],
    "index_nested": b"[" * 100_000,
    "index_not_json": b"\xff\xfe{",
    "index_missing_shard": {"weight_map": {"a": "absent.safetensors", "b": "s.safetensors"}},
}


def _hostile_folder(ws, raw=None, index=None):
    """e1 holding keys a and b: the crafted model.safetensors, or a valid shard behind the
    crafted index; base and e2: valid a, b."""
    good = {"a": A, "b": A + 4}
    base = write_checkpoint(ws.root / "in2" / "base", good)
    other = write_checkpoint(ws.root / "in2" / "e2", {k: v + 1 for k, v in good.items()})
    e1 = ws.root / "in2" / "e1"
    e1.mkdir()
    if raw is not None:
        (e1 / "model.safetensors").write_bytes(raw)
        return base, [e1, other], e1 / "model.safetensors"
    (e1 / "s.safetensors").write_bytes(st_bytes(good))
    (e1 / INDEX).write_bytes(index if isinstance(index, bytes) else json.dumps(index).encode())
    return base, [e1, other], e1 / INDEX


def _refused_everywhere(ws, path, base, experts, named, match):
    before = snapshot(ws.root / "in2")
    code, err = ws.merge(path, base=base, experts=experts)
    assert_refused(code, err, named)
    assert len(err) < 1000, err
    assert not ws.out.exists() and hidden_beside(ws.out) == []
    with pytest.raises(MergeInputError, match=match):
        if path == "memory":
            load_state_dict(experts[0])
        else:
            merge_checkpoints(base, experts, ws.out, "mean", progress=False)
    assert not ws.out.exists() and hidden_beside(ws.out) == []
    assert snapshot(ws.root / "in2") == before


def test_the_valid_hand_built_file_is_accepted(ws):
    valid = raw_file({"a": ent(0, 16), "b": ent(16, 32)}, DATA)
    base, experts, _ = _hostile_folder(ws, raw=valid)
    assert torch.equal(load_state_dict(experts[0])["b"], A + 4)
    for path in PATH_ARGS:
        code, err = ws.merge(path, base=base, experts=experts, out=ws.root / path)
        assert code == 0, err


@BOTH
@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_a_malformed_header_is_refused_on_both_paths(ws, path, case):
    base, experts, named = _hostile_folder(ws, raw=HEADER_CASES[case])
    _refused_everywhere(ws, path, base, experts, named, "not a readable safetensors file")


@BOTH
@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_a_malformed_index_is_refused_on_both_paths(ws, path, case):
    base, experts, named = _hostile_folder(ws, index=INDEX_CASES[case])
    _refused_everywhere(ws, path, base, experts, named, INDEX)


@BOTH
@pytest.mark.parametrize("shape", [(2**70, 0), (2**40, 2**40, 0)], ids=["2^70x0", "2^40x2^40x0"])
def test_zero_element_shapes_too_large_for_torch_are_refused(ws, path, shape):
    raw = raw_file({"a": ent(0, 0, shape=shape), "b": ent(0, 16)}, DATA[:16])
    folders = []
    for name in ("base", "e1", "e2"):
        (ws.root / "in2" / name).mkdir(parents=True)
        (ws.root / "in2" / name / "model.safetensors").write_bytes(raw)
        folders.append(ws.root / "in2" / name)
    code, err = ws.merge(path, base=folders[0], experts=folders[1:])
    assert_refused(code, err, "model.safetensors")
    assert not ws.out.exists() and hidden_beside(ws.out) == []


@BOTH
def test_checkpoints_without_tensors_are_refused_cleanly(ws, path):
    folders = [write_checkpoint(ws.root / "in2" / n, {}) for n in ("base", "e1", "e2")]
    code, err = ws.merge(path, base=folders[0], experts=folders[1:])
    assert_refused(code, err)
    assert not ws.out.exists() and hidden_beside(ws.out) == []


def _long_name_inputs(ws, case):
    """Checkpoints whose own names (a shard in an index, a key) are a megabyte long."""
    key = "k" * 1_000_000
    folder = ws.root / "in2"
    good = {"w": torch.randn(4, 3), "b": torch.randn(4)}
    base = write_checkpoint(folder / "base", good)
    if case == "shard_name":
        e1 = folder / "e1"
        e1.mkdir()
        (e1 / "s.safetensors").write_bytes(st_bytes(good))
        (e1 / INDEX).write_text(json.dumps({"weight_map": {
            "w": "a" * 100_000 + ".safetensors", "b": "s.safetensors"}}))
    elif case == "extra_key":
        e1 = write_checkpoint(folder / "e1", {key: good["w"], "b": good["b"]})
    elif case == "key_shape":
        base = write_checkpoint(folder / "base2", {key: good["w"]})
        e1 = write_checkpoint(folder / "e1", {key: good["w"].T.contiguous()})
    else:                                             # NaN in a long-named key
        base = write_checkpoint(folder / "base2", {key: good["w"]})
        e1 = write_checkpoint(folder / "e1", {key: torch.full((4, 3), float("nan"))})
    return base, [e1]


LONG_NAME_CASES = [("shard_name", "memory"), ("shard_name", "stream"), ("extra_key", "memory"),
                   ("extra_key", "stream"), ("key_shape", "memory"), ("key_shape", "stream"),
                   ("key_nan", "memory"), ("key_nan", "stream"), ("key_nan", "score")]

@pytest.mark.parametrize("case, path", LONG_NAME_CASES)
def test_megabyte_names_inside_a_checkpoint_give_a_short_message(ws, case, path):
    base, experts = _long_name_inputs(ws, case)
    extra = ["--method", "score"] if path == "score" else []
    code, err = ws.merge(path, *extra, base=base, experts=experts)
    assert_refused(code, err)
    assert len(err) < 1000, (len(err), err[:200])
    assert not ws.out.exists() and hidden_beside(ws.out) == []


@BOTH
@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2"])
def test_float8_checkpoints_are_merged_or_refused_cleanly(ws, path, dtype):
    t = torch.ones(4, 3).to(DTYPES_BY_NAME[dtype]).reshape(-1).view(torch.uint8)
    raw = raw_file({"x": ent(0, 12, shape=(4, 3), dtype=dtype), "w": ent(12, 60, shape=(4, 3))},
                   t.numpy().tobytes() + torch.randn(4, 3).numpy().tobytes())
    folders = []
    for name in ("base", "e1"):
        (ws.root / "in2" / name).mkdir(parents=True)
        (ws.root / "in2" / name / "model.safetensors").write_bytes(raw)
        folders.append(ws.root / "in2" / name)
    code, err = ws.merge(path, base=folders[0], experts=folders[1:])
    assert code in (0, 2) and "Traceback" not in err, err
    assert hidden_beside(ws.out) == []
    if code == 2:
        assert_refused(code, err, "x")


# ------------------------------------------------------------------ 9. safetensors before .bin

@pytest.mark.parametrize("layout", ["single", "indexed"])
def test_safetensors_are_preferred_to_pickled_weights_on_both_paths(ws, layout):
    odd = ws.expert_sds[0]
    mixed = ws.root / "in" / "mixed"
    if layout == "single":                # model.safetensors + pytorch_model.bin.index.json
        write_checkpoint(mixed, odd)
        torch.save({k: v * 0 + 99 if v.is_floating_point() else v for k, v in odd.items()},
                   mixed / "pytorch_model-00001-of-00001.bin")
        (mixed / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"weight_map": dict.fromkeys(odd, "pytorch_model-00001-of-00001.bin")}))
    else:                                 # model.safetensors.index.json + pytorch_model.bin
        write_checkpoint(mixed, odd, shards=2)
        torch.save({k: v * 0 + 99 if v.is_floating_point() else v for k, v in odd.items()},
                   mixed / "pytorch_model.bin")
    assert Checkpoint(mixed).format == "safetensors"
    same_values(load_state_dict(mixed), odd)
    experts = [mixed, ws.experts[1]]
    streamed = ws.root / "streamed"
    merge_checkpoints(ws.base, experts, streamed, "mean", progress=False)
    same_values(load_state_dict(streamed), ws.want("stream"))
    for path in PATH_ARGS:
        out = ws.root / f"cli-{path}"
        code, err = ws.merge(path, experts=experts, out=out)
        assert code == 0, err
        same_values(load_state_dict(out), ws.want(path))
