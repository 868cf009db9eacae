"""Checkpoint reading and atomic, sharded writing."""
import json

import pytest
import torch
from safetensors import safe_open

from scoremerge import MergeInputError
from scoremerge.io import load_state_dict, parse_size, save_state_dict
from scoremerge.io import write as write_module
from scoremerge.io.atomic import write_file_atomically


def state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(30, 20, generator=g), "a.bias": torch.randn(30, generator=g),
            "b.weight": torch.randn(20, 30, generator=g).to(torch.bfloat16),
            "ids": torch.arange(7)}


def same(x, y):
    """Equal keys, values and dtypes (safetensors files list keys sorted, so order is free)."""
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)


def test_single_file_round_trip_with_metadata(tmp_path):
    save_state_dict(state(), tmp_path / "out", metadata={"method": "score"})
    assert same(load_state_dict(tmp_path / "out"), state())
    assert same(load_state_dict(tmp_path / "out" / "model.safetensors"), state())
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.metadata()["method"] == "score" and "scoremerge_version" in f.metadata()


def test_sharded_round_trip_with_index(tmp_path):
    save_state_dict(state(), tmp_path / "out", max_shard_size="2KB", metadata={"method": "ties"})
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 2 and files == shards + ["model.safetensors.index.json"]
    assert shards[0] == "model-00001-of-00002.safetensors"
    assert set(index["weight_map"]) == set(state()) and index["metadata"]["method"] == "ties"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state().values())
    assert same(load_state_dict(tmp_path / "out"), state())


def test_torch_files_and_tied_tensors(tmp_path):
    torch.save(state(), tmp_path / "m.pt")
    assert same(load_state_dict(tmp_path / "m.pt"), state())
    tied = state()
    tied["tied"] = tied["a.weight"]
    save_state_dict(tied, tmp_path / "tied")
    assert torch.equal(load_state_dict(tmp_path / "tied")["tied"], tied["a.weight"])


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_finish(writer):
        calls.append(writer.path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(writer)
    real = write_module.ShardWriter.finish
    monkeypatch.setattr(write_module.ShardWriter, "finish", failing_finish)
    with pytest.raises(OSError, match="disk full"):
        save_state_dict(state(), tmp_path / "out", max_shard_size="2KB")
    assert list(tmp_path.iterdir()) == []


def test_outputs_get_plain_mkdir_and_open_permissions(tmp_path):
    """Temporary files and folders are private (0600 / 0700); what is renamed into place must not
    stay so, or a merged model on a shared machine is unreadable by everyone else."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("")
    save_state_dict({"w": torch.ones(3)}, tmp_path / "m")
    write_file_atomically(tmp_path / "r.json", lambda p: open(p, "w").write("{}"))
    assert (tmp_path / "m").stat().st_mode == (tmp_path / "plain").stat().st_mode
    for f in (tmp_path / "m" / "model.safetensors", tmp_path / "r.json"):
        assert f.stat().st_mode == (tmp_path / "plain.txt").stat().st_mode, f


def test_a_failed_file_write_keeps_the_old_file(tmp_path):
    (tmp_path / "r.json").write_text("old")

    def fail(p):
        open(p, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_file_atomically(tmp_path / "r.json", fail)
    assert (tmp_path / "r.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_existing_output_needs_overwrite_and_is_replaced_whole(tmp_path):
    save_state_dict(state(0), tmp_path / "out", max_shard_size="2KB")
    with pytest.raises(MergeInputError, match="not empty"):
        save_state_dict(state(1), tmp_path / "out")
    save_state_dict(state(1), tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]
    assert same(load_state_dict(tmp_path / "out"), state(1))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_overwrite_replaces_only_what_the_previous_merge_wrote(tmp_path):
    """The weights' metadata lists the files a merge wrote; anything else in the folder (a
    user's notes beside a merged model) makes --overwrite refuse, and nothing is removed."""
    (tmp_path / "config.json").write_text("{}")
    save_state_dict(state(0), tmp_path / "out", max_shard_size="2KB",
                    extra_files=[tmp_path / "config.json"])
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(MergeInputError, match="'notes.txt', which the merge did not write"):
        save_state_dict(state(1), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    (tmp_path / "out" / "notes.txt").unlink()
    save_state_dict(state(1), tmp_path / "out", overwrite=True)
    assert same(load_state_dict(tmp_path / "out"), state(1))


def test_unreadable_inputs_are_named(tmp_path):
    save_state_dict(state(), tmp_path / "ok")
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MergeInputError, match=r"cut\.safetensors: not a readable safetensors file"):
        load_state_dict(tmp_path / "cut.safetensors")
    torch.save(state(), tmp_path / "m.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:100])
    with pytest.raises(MergeInputError, match=r"cut\.pt: not a readable torch checkpoint"):
        load_state_dict(tmp_path / "cut.pt")
    with pytest.raises(MergeInputError, match="no such file"):
        load_state_dict(tmp_path / "missing")
    with pytest.raises(MergeInputError, match="unknown checkpoint type '.npz'"):
        (tmp_path / "x.npz").write_bytes(b"")
        load_state_dict(tmp_path / "x.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeInputError, match="no checkpoint found"):
        load_state_dict(tmp_path / "empty")
    torch.save({"state_dict": state(), "epoch": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(MergeInputError, match="under 'state_dict'"):
        load_state_dict(tmp_path / "ckpt.pt")


def test_broken_shard_sets_are_named(tmp_path):
    save_state_dict(state(), tmp_path / "s", max_shard_size="2KB")
    index_path = tmp_path / "s" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(MergeInputError, match=r"places 'ghost' in model-00001-of-00002.safetensors, which does not hold it"):
        load_state_dict(tmp_path / "s")
    del index["weight_map"]["ghost"]
    index_path.write_text(json.dumps(index))
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MergeInputError, match="shard 'model-00002-of-00002.safetensors'.* is missing"):
        load_state_dict(tmp_path / "s")


def test_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size(1000) == 1000
    for bad in ("-1GB", "lots", "5XB", 0):
        with pytest.raises(MergeInputError, match="not a positive size"):
            parse_size(bad)
