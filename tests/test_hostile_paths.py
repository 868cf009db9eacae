"""Hostile paths: an index escaping its folder, the Hugging Face cache, side files. See
tests/hostile.py for what every case checks."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from scoremerge import MergeInputError
from scoremerge.io import load_state_dict
from scoremerge.io.access import side_files
from scoremerge.io.checkpoint import WEIGHT_FILES
from scoremerge.streaming import merge_checkpoints

# ws is a fixture: pytest finds it by the name the tests take
from hostile import (MARKER, INDEX, PATH_ARGS, BOTH, st_bytes, shard_name, write_checkpoint,
                     hidden_beside, assert_refused, all_bytes, same_values, recording_opens,
                     deadline, ws)  # noqa: F401


def test_the_workspace_merges_on_both_paths(ws):
    for path in PATH_ARGS:
        out = ws.root / f"ok-{path}"
        code, err = ws.merge(path, out=out)
        assert code == 0, err
        same_values(load_state_dict(out), ws.want(path))
        assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    assert hidden_beside(ws.out) == []


# ------------------------------------------------------------------ 1. an index escaping its folder

ESCAPES = ["dotdot", "absolute", "slash", "nul", "link_foreign", "link_passwd"]


def _escape(ws, how):
    """Make e1's second shard point outside e1; (the entry the message must name, the foreign
    file a merge must never open, text of it that must never be echoed)."""
    e1 = ws.experts[0]
    second = shard_name(2, 2)
    foreign = ws.inputs / "elsewhere" / "x.safetensors"
    foreign.parent.mkdir()
    part = {k: v for k, v in ws.expert_sds[0].items()
            if json.loads((e1 / INDEX).read_text())["weight_map"][k] == second}
    foreign.write_bytes(st_bytes({k: torch.full_like(v, 1234.5) if v.is_floating_point() else v
                                  for k, v in part.items()}, metadata={"secret": MARKER}))
    if how.startswith("link"):
        target = foreign if how == "link_foreign" else Path("/etc/passwd")
        (e1 / second).unlink()
        (e1 / second).symlink_to(target)
        secret = MARKER if how == "link_foreign" else Path("/etc/passwd").read_text()[:20]
        return second, target, secret
    entry = {"dotdot": "../elsewhere/x.safetensors", "absolute": str(foreign),
             "slash": "sub/x.safetensors", "nul": "x\0.safetensors"}[how]
    if how == "slash":
        (e1 / "sub").mkdir()
        (e1 / "sub" / "x.safetensors").write_bytes(foreign.read_bytes())
    index = json.loads((e1 / INDEX).read_text())
    index["weight_map"] = {k: entry if s == second else s for k, s in index["weight_map"].items()}
    (e1 / INDEX).write_text(json.dumps(index))
    named = "x.safetensors" if how == "absolute" else entry.replace("\0", "\\x00")
    return named, foreign, MARKER        # (a long entry is quoted shortened, keeping its end)


@BOTH
@pytest.mark.parametrize("how", ESCAPES)
def test_an_index_may_name_only_files_in_its_own_folder(ws, path, how):
    named, target, secret = _escape(ws, how)
    before = ws.snap()
    with recording_opens() as opened:
        code, err = ws.merge(path)
        with pytest.raises(MergeInputError, match="plain file name|outside the checkpoint"):
            if path == "memory":
                load_state_dict(ws.experts[0])
            else:
                merge_checkpoints(ws.base, ws.experts, ws.out, "mean", progress=False)
    assert_refused(code, err, named)
    assert secret not in err and "1234.5" not in err
    assert any(p.endswith(INDEX) for p in opened)                # the recording works
    assert not any(Path(p).resolve() == target.resolve() for p in opened), "target was opened"
    assert not ws.out.exists() and hidden_beside(ws.out) == []
    assert ws.snap() == before


# ------------------------------------------------------------------ 2. the Hugging Face cache

def hf_snapshot(cache, repo, files, rev="4f1c0ffee"):
    """models--org--<repo>/snapshots/<rev>/<name> -> ../../blobs/<sha256>, as the hub lays out."""
    repo_dir = cache / f"models--org--{repo}"
    snap, blobs = repo_dir / "snapshots" / rev, repo_dir / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    for name, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snap / name).symlink_to(Path("../../blobs") / digest)
    return snap


def _hf_inputs(ws):
    cache = ws.inputs / "hub"
    base = hf_snapshot(cache, "base", {
        "model.safetensors": st_bytes(ws.base_sd), "config.json": b'{"model_type": "hf"}',
        "tokenizer.json": b'{"vocab": {"b": 1}}'})
    sharded = write_checkpoint(ws.root / "tmp-e1", ws.expert_sds[0], shards=2)
    e1 = hf_snapshot(cache, "e1", {p.name: p.read_bytes() for p in sharded.iterdir()})
    e2 = hf_snapshot(cache, "e2", {"model.safetensors": st_bytes(ws.expert_sds[1])})
    return cache, base, [e1, e2]


@BOTH
def test_a_hugging_face_cache_snapshot_merges_and_its_side_files_are_copied(ws, path):
    cache, base, experts = _hf_inputs(ws)
    assert (experts[0] / INDEX).is_symlink()
    before = ws.snap()
    code, err = ws.merge(path, base=base, experts=experts)
    assert code == 0, err
    same_values(load_state_dict(ws.out), ws.want(path))
    assert (ws.out / "config.json").read_bytes() == b'{"model_type": "hf"}'
    assert (ws.out / "tokenizer.json").read_bytes() == b'{"vocab": {"b": 1}}'
    assert not any(p.is_symlink() for p in ws.out.iterdir())
    assert "not copied" not in err
    assert ws.snap() == before and hidden_beside(ws.out) == []
    # the library entry points agree
    same_values(load_state_dict(experts[0]), ws.expert_sds[0])
    stats = merge_checkpoints(base, experts, ws.root / "api-out", "mean", progress=False)
    assert stats["shards_written"] == 1


@BOTH
@pytest.mark.parametrize("where", ["other_repo", "outside_cache"])
def test_cache_links_leaving_their_repository_are_refused(ws, path, where):
    cache, base, experts = _hf_inputs(ws)
    if where == "other_repo":          # another repository's blob in the same cache
        target = next((cache / "models--org--e2" / "blobs").iterdir())
    else:
        target = ws.root / "outside.safetensors"
        target.write_bytes(st_bytes(ws.base_sd, metadata={"secret": MARKER}))
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").symlink_to(os.path.relpath(target, base))
    before = ws.snap()
    code, err = ws.merge(path, base=base, experts=experts)
    assert_refused(code, err, "model.safetensors", "outside the checkpoint folder")
    assert MARKER not in err
    assert not ws.out.exists() and hidden_beside(ws.out) == [] and ws.snap() == before


@BOTH
def test_a_cache_side_file_leaving_its_repository_is_not_copied(ws, path):
    cache, base, experts = _hf_inputs(ws)
    secret = ws.root / "secret.json"
    secret.write_text(json.dumps({"token": MARKER}))
    (base / "config.json").unlink()
    (base / "config.json").symlink_to(os.path.relpath(secret, base))
    code, err = ws.merge(path, base=base, experts=experts)
    assert code == 0, err
    assert any("not copied" in line and "config.json" in line for line in err.splitlines()), err
    assert not (ws.out / "config.json").exists() and (ws.out / "tokenizer.json").is_file()
    assert not any(MARKER.encode() in b for b in all_bytes(ws.out).values())


@BOTH
def test_a_model_in_a_subfolder_of_a_cache_snapshot_merges(ws, path):
    repo = ws.inputs / "hub" / "models--org--pipeline"
    snap, blobs = repo / "snapshots" / "4f1c0ffee", repo / "blobs"
    (snap / "text_encoder").mkdir(parents=True)
    blobs.mkdir()
    for name, data in {"model.safetensors": st_bytes(ws.base_sd),
                       "config.json": b'{"model_type": "sub"}'}.items():
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        (snap / "text_encoder" / name).symlink_to(Path("../../../blobs") / digest)
    code, err = ws.merge(path, base=snap / "text_encoder")
    assert code == 0, err
    same_values(load_state_dict(ws.out), ws.want(path))
    assert (ws.out / "config.json").read_bytes() == b'{"model_type": "sub"}'


@BOTH
def test_fifos_in_a_checkpoint_are_refused_without_being_opened(ws, path):
    os.mkfifo(ws.base / "fifo.json")                          # a side file
    fifo = ws.inputs / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "model.safetensors")                     # the weights
    with deadline(20):
        code, err = ws.merge(path, experts=[fifo, ws.experts[1]])
    assert_refused(code, err, "model.safetensors", "not a regular file")
    with deadline(20):
        code, err = ws.merge(path)
    assert code == 0, err
    assert any("not copied" in line and "fifo.json" in line for line in err.splitlines()), err
    assert not (ws.out / "fifo.json").exists()


# ------------------------------------------------------------------ 3. side files

@BOTH
def test_side_files_leaving_the_folder_are_not_copied(ws, path):
    secret = ws.root / "secret-token.txt"
    secret.write_text(MARKER)
    (ws.base / "tokenizer_config.json").symlink_to("/proc/self/environ")
    (ws.base / "special_tokens_map.json").symlink_to(secret)
    (ws.base / "added_tokens.json").symlink_to("../e1/" + INDEX)     # a sibling input's file
    (ws.base / "vocab.txt").symlink_to("tokenizer.json")              # inside: a regular file
    (ws.base / "generation_config.json").write_text('{"max_length": 7}')
    (ws.base / "folder.json").mkdir()                                  # not a regular file
    files, skipped = side_files(ws.base, WEIGHT_FILES)
    assert {name for name, _ in files} == {"config.json", "generation_config.json",
                                           "tokenizer.json", "vocab.txt"}
    assert set(skipped) == {"tokenizer_config.json", "special_tokens_map.json",
                            "added_tokens.json", "folder.json"}
    before = ws.snap()
    code, err = ws.merge(path)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "not copied" in line]
    for name in skipped:
        assert any(name in line for line in lines), (name, err)
    assert MARKER not in err and "PATH=" not in err
    got = all_bytes(ws.out)
    assert set(got) >= {"config.json", "generation_config.json", "tokenizer.json", "vocab.txt"}
    assert not set(got) & set(skipped)
    assert got["vocab.txt"] == (ws.base / "tokenizer.json").read_bytes()
    assert got["generation_config.json"] == b'{"max_length": 7}'
    assert not any(MARKER.encode() in b or b"PATH=" in b for b in got.values())
    assert not any(p.is_symlink() for p in ws.out.iterdir())
    assert ws.snap() == before and hidden_beside(ws.out) == []
