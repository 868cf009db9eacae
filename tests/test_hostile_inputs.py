"""Hostile and unlucky inputs: every crafted file is built here, byte by byte where it
matters (headers from struct.pack('<Q', n) + JSON + data), with symlinks, YAML aliases and racing
processes. For each case: the exit code of `scoremerge merge`, on the in-memory path (`--method
ties`, whose global scope cannot stream, or a .pt expert) and on the streaming path (`--stream`)
where both apply; a one-line message naming the cause; every file under the inputs' folder
byte-identical afterwards; and, when the input was bad, nothing left beside --out (no partial,
lock or temporary folder)."""
import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from scoremerge import MergeInputError, api
from scoremerge.cli import main
from scoremerge.io import load_state_dict, save_state_dict
from scoremerge.io import shard_writer
from scoremerge.io.access import output_lock, side_files
from scoremerge.io.checkpoint import WEIGHT_FILES, Checkpoint
from scoremerge.streaming import merge_checkpoints

REPO = Path(__file__).resolve().parents[1]
MARKER = "SCOREMERGE-HOSTILE-TEST-SECRET-7f3c9e"
INDEX = "model.safetensors.index.json"
NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}
DTYPES_BY_NAME = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# The in-memory merge: TIES over the whole model cannot stream. The streaming merge: required.
PATH_ARGS = {"memory": ["--method", "ties"], "stream": ["--method", "mean", "--stream"]}
PATH_METHOD = {"memory": "ties", "stream": "mean"}
BOTH = pytest.mark.parametrize("path", ["memory", "stream"])


# ------------------------------------------------------------------ files built by hand

def raw_file(header, data=b""):
    """8 bytes of little-endian header length, the header (bytes, or an object to JSON), data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def st_bytes(tensors, metadata=None):
    header, data = {}, bytearray()
    if metadata is not None:
        header["__metadata__"] = metadata
    for key, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return raw_file(header, bytes(data))


def shard_name(i, n):
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def write_checkpoint(folder, sd, shards=1):
    """A Hugging Face-style folder: model.safetensors, or `shards` shards and their index."""
    folder.mkdir(parents=True, exist_ok=True)
    if shards == 1:
        (folder / "model.safetensors").write_bytes(st_bytes(sd))
        return folder
    keys, weight_map = list(sd), {}
    for i in range(shards):
        part = {k: sd[k] for k in keys[i::shards]}
        (folder / shard_name(i + 1, shards)).write_bytes(st_bytes(part))
        weight_map.update(dict.fromkeys(part, shard_name(i + 1, shards)))
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 0},
                                            "weight_map": weight_map}))
    return folder


def base_model(seed=0, n=3, shape=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    sd = {f"layers.{i}.w": torch.randn(*shape, generator=g) for i in range(n)}
    return sd | {"layers.b": torch.randn(shape[0], generator=g), "ids": torch.arange(4)}


def expert_of(base, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point()
            else v.clone() for k, v in base.items()}


def snapshot(*roots):
    """{path: sha256 of a file | the target of a link | 'dir'} of everything under the roots,
    never through a link."""
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs:
                p = Path(folder) / name
                out[str(p)] = f"link->{os.readlink(p)}" if p.is_symlink() else "dir"
            for name in files:
                p = Path(folder) / name
                out[str(p)] = f"link->{os.readlink(p)}" if p.is_symlink() else \
                    hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def hidden_beside(out):
    """Names starting with '.' beside `out`: partial, lock or temporary folders left behind."""
    return sorted(p.name for p in Path(out).parent.iterdir() if p.name.startswith("."))


def assert_refused(code, err, *names):
    """Exit 2, one line of error (after any 'not copied' lines), naming each of `names`."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("scoremerge: error: "), err
    assert all(line.startswith("scoremerge: not copied: ") for line in lines[:-1]), err
    for name in names:
        assert str(name) in lines[-1], (name, lines[-1])


def all_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def same_values(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


# Every file opened in this process while recording: a refused target must never be opened.
_OPENED = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes,
                                                                                 os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def recording_opens():
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


@contextmanager
def deadline(seconds):
    """Raise TimeoutError in this thread after `seconds`: a merge that opens a FIFO for reading
    fails here instead of hanging the suite."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Workspace:
    """root/in/{base (2 shards + index, config.json, tokenizer.json), e1 (2 shards + index),
    e2 (model.safetensors)}; out = root/out."""

    def __init__(self, tmp_path, capsys):
        self.capsys = capsys
        self.root = tmp_path / "w"
        self.inputs = self.root / "in"
        self.base_sd = base_model(0)
        self.expert_sds = [expert_of(self.base_sd, s) for s in (1, 2)]
        self.base = write_checkpoint(self.inputs / "base", self.base_sd, shards=2)
        (self.base / "config.json").write_text('{"model_type": "toy"}')
        (self.base / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
        self.experts = [write_checkpoint(self.inputs / "e1", self.expert_sds[0], shards=2),
                        write_checkpoint(self.inputs / "e2", self.expert_sds[1])]
        self.out = self.root / "out"

    def merge(self, path, *extra, base=None, experts=None, out=None):
        """`scoremerge merge` in this process: (exit code, stderr)."""
        base = self.base if base is None else base
        experts = self.experts if experts is None else experts
        out = self.out if out is None else out
        self.capsys.readouterr()
        code = main(["merge", "--base", str(base), "--experts", *map(str, experts),
                     "--out", str(out), "--no-progress", *PATH_ARGS.get(path, []), *extra])
        return code, self.capsys.readouterr().err

    def run(self, argv):
        """`scoremerge <argv>` in this process: (exit code, stderr)."""
        self.capsys.readouterr()
        code = main([str(a) for a in argv])
        captured = self.capsys.readouterr()
        self.stdout = captured.out
        return code, captured.err

    def want(self, path, **kw):
        return api.merge(self.base_sd, self.expert_sds, PATH_METHOD[path], **kw)

    def snap(self):
        return snapshot(self.inputs)


@pytest.fixture
def ws(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SCOREMERGE_DEBUG", raising=False)
    return Workspace(tmp_path, capsys)


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


# ------------------------------------------------------------------ 4. --out against the inputs

OUT_TARGETS = ["base", "expert", "expert_file", "tmp_root", "inside_base", "link_to_base",
               "inside_via_link"]


def _out_target(ws, which):
    experts = [ws.experts[0], ws.experts[1] / "model.safetensors"]     # a folder and a file
    out = {"base": ws.base, "expert": ws.experts[0], "expert_file": experts[1],
           "tmp_root": ws.root, "inside_base": ws.base / "merged",
           "link_to_base": ws.root / "link", "inside_via_link": ws.root / "link" / "merged"}[which]
    if which in ("link_to_base", "inside_via_link"):
        (ws.root / "link").symlink_to(ws.base)
    return out, experts


@BOTH
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
@pytest.mark.parametrize("which", OUT_TARGETS)
def test_the_output_may_not_be_hold_or_lie_in_an_input(ws, path, overwrite, which):
    out, experts = _out_target(ws, which)
    before, beside = ws.snap(), sorted(p.name for p in out.parent.iterdir())
    code, err = ws.merge(path, *(["--overwrite"] if overwrite else []), experts=experts, out=out)
    assert_refused(code, err, "the output")
    assert ws.snap() == before
    assert sorted(p.name for p in out.parent.iterdir()) == beside      # no lock, partial, temp
    with pytest.raises(MergeInputError, match="the output"):
        merge_checkpoints(ws.base, experts, out, "mean", overwrite=overwrite, progress=False)
    assert ws.snap() == before


# ------------------------------------------------------------------ 5. --overwrite

def _not_an_output(ws, which):
    out = ws.out
    out.mkdir()
    if which == "notes_and_subfolder":
        (out / "notes.txt").write_text("my notes")
        (out / "sub").mkdir()
        (out / "sub" / "data.bin").write_bytes(b"precious")
    elif which == "notes_only":
        (out / "notes.txt").write_text("my notes")
    elif which == "foreign_weights":                     # a model, not written by scoremerge
        (out / "model.safetensors").write_bytes(st_bytes(ws.base_sd, metadata={"format": "pt"}))
        (out / "config.json").write_text("{}")
    elif which == "foreign_index":
        write_checkpoint(out, ws.base_sd, shards=2)
    elif which == "output_with_a_link":                  # a real output, plus a planted link
        save_state_dict(ws.base_sd, ws.root / "prev")
        os.rmdir(out)
        os.replace(ws.root / "prev", out)
        (out / "tokenizer.json").symlink_to("/etc/passwd")
    return out


@BOTH
@pytest.mark.parametrize("which", ["notes_and_subfolder", "notes_only", "foreign_weights",
                                   "foreign_index", "output_with_a_link"])
def test_overwrite_replaces_only_a_previous_merge(ws, path, which):
    out = _not_an_output(ws, which)
    before = ws.snap() | snapshot(out)
    code, err = ws.merge(path, "--overwrite")
    assert_refused(code, err, "--overwrite replaces only")
    assert ws.snap() | snapshot(out) == before and hidden_beside(out) == []


@BOTH
def test_overwrite_replaces_a_previous_merge(ws, path):
    code, err = ws.merge(path)
    assert code == 0, err
    first = all_bytes(ws.out)
    code, err = ws.merge(path)
    assert_refused(code, err, "not empty")
    assert all_bytes(ws.out) == first
    code, err = ws.merge(path, "--overwrite", "--alpha", "0.5")
    assert code == 0, err
    same_values(load_state_dict(ws.out), ws.want(path, alpha=0.5))
    assert hidden_beside(ws.out) == []


def test_an_output_symlink_and_a_planted_build_folder_are_refused(ws):
    victim = ws.root / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("keep me")
    (ws.root / "out").symlink_to(victim)
    code, err = ws.merge("stream", "--overwrite")
    assert_refused(code, err, "symlink")
    (ws.root / "out").unlink()
    partial = ws.root / ".out.scoremerge-partial"
    partial.symlink_to(victim)                           # a planted build folder: a link
    code, err = ws.merge("stream")
    assert_refused(code, err, ".out.scoremerge-partial")
    partial.unlink()
    partial.mkdir()                                      # a real one, holding something else
    (partial / "keep.txt").write_text("keep me too")
    (partial / "sub").mkdir()
    code, err = ws.merge("stream", "--resume")
    assert_refused(code, err, "sub")
    assert (victim / "keep.txt").read_text() == "keep me"
    assert (partial / "keep.txt").read_text() == "keep me too" and (partial / "sub").is_dir()
    assert not ws.out.exists()


def test_a_planted_lock_link_is_never_followed(ws):
    victim = ws.root / "victim.txt"
    victim.write_text("keep me")
    (ws.root / ".out.scoremerge-lock").symlink_to(victim)
    for path in PATH_ARGS:
        code, err = ws.merge(path)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert victim.read_text() == "keep me" and not ws.out.exists()
    assert (ws.root / ".out.scoremerge-lock").is_symlink()


# ------------------------------------------------------------------ 6. two runs into one --out

@BOTH
def test_a_second_run_refuses_while_the_lock_is_held(ws, path):
    before = ws.snap()
    with output_lock(ws.out):
        code, err = ws.merge(path)
        assert_refused(code, err, "another scoremerge run is writing")
        with pytest.raises(MergeInputError, match="another scoremerge run"):
            merge_checkpoints(ws.base, ws.experts, ws.out, "mean", progress=False)
        with pytest.raises(MergeInputError, match="another scoremerge run"):
            save_state_dict(ws.base_sd, ws.out)
        assert not ws.out.exists()
    assert hidden_beside(ws.out) == [] and ws.snap() == before
    code, err = ws.merge(path)
    assert code == 0, err
    assert hidden_beside(ws.out) == []


@BOTH
def test_a_run_started_during_a_merge_refuses_and_the_first_finishes(ws, path, monkeypatch):
    second = []
    hook = "load" if path == "memory" else "read"
    real = getattr(Checkpoint, hook)

    def racing(self, *args):
        if not second:
            second.append(None)
            second[0] = ws.merge(path)           # a second `scoremerge merge` into the same --out
        return real(self, *args)

    monkeypatch.setattr(Checkpoint, hook, racing)
    ws.capsys.readouterr()
    code = main(["merge", "--base", str(ws.base), "--experts", *map(str, ws.experts),
                 "--out", str(ws.out), "--no-progress", *PATH_ARGS[path]])
    err = ws.capsys.readouterr().err
    assert code == 0, err
    assert_refused(*second[0], "another scoremerge run is writing")
    same_values(load_state_dict(ws.out), ws.want(path))
    assert hidden_beside(ws.out) == []


def _python(script, **env):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": str(REPO)} | env)


def test_a_lock_held_by_another_process_blocks_and_a_dead_ones_file_does_not(ws):
    holder = _python(f"""
        import sys
        from scoremerge.io.access import output_lock
        with output_lock({str(ws.out)!r}):
            print("locked", flush=True)
            sys.stdin.read()
        """)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        for path in PATH_ARGS:
            code, err = ws.merge(path)
            assert_refused(code, err, "another scoremerge run is writing")
    finally:
        holder.kill()
        holder.wait()
    assert (ws.root / ".out.scoremerge-lock").exists()      # left by the killed holder
    code, err = ws.merge("stream")
    assert code == 0, err
    assert hidden_beside(ws.out) == []


# ------------------------------------------------------------------ 7. inputs changed while read

def _rewrite_in_place(path):
    size = path.stat().st_size
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, struct.pack("<f", 777.0), size - 4)
    finally:
        os.close(fd)
    assert path.stat().st_size == size


def _replace(path):
    tmp = path.with_name(".replacement")
    data = bytearray(path.read_bytes())
    data[-4:] = struct.pack("<f", 777.0)
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


@BOTH
@pytest.mark.parametrize("change", [_rewrite_in_place, _replace], ids=["rewritten", "replaced"])
def test_an_input_changed_during_the_merge_fails_it(ws, path, change, monkeypatch):
    victim = ws.experts[0] / shard_name(2, 2)
    os.utime(victim, ns=(10**18, 10**18))       # long ago: a rewrite now changes the mtime
    real_read, reads = Checkpoint.read, []

    def read(self, key, *args, **kwargs):
        if len(reads) == 1:
            change(victim)                        # after the first read
        reads.append(key)
        return real_read(self, key, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "read", read)
    code, err = ws.merge(path)
    assert_refused(code, err, victim.name, "while it was being read")
    assert not ws.out.exists() and hidden_beside(ws.out) == []
    reads.clear()
    os.utime(victim, ns=(10**18, 10**18))
    with pytest.raises(MergeInputError, match=f"{victim.name}: .* while it was being read"):
        if path == "memory":
            load_state_dict(ws.experts[0])
        else:
            merge_checkpoints(ws.base, ws.experts, ws.out, "mean", progress=False)
    assert not ws.out.exists() and hidden_beside(ws.out) == []


def _interrupt_after_one_shard(ws, out, monkeypatch):
    """A streaming CLI merge into `out` interrupted (KeyboardInterrupt, exit 130) after its first
    completed shard."""
    real_finish, real_put = shard_writer.ShardWriter.finish, shard_writer.ShardWriter.put
    finished = []

    def finish(self):
        real_finish(self)
        finished.append(self.path.name)

    def put(self, *args, **kwargs):
        if finished:
            raise KeyboardInterrupt
        real_put(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(shard_writer.ShardWriter, "finish", finish)
        m.setattr(shard_writer.ShardWriter, "put", put)
        code, err = ws.merge("stream", "--max-shard-size", "150B", out=out)
    assert code == 130 and "--resume" in err, err
    assert (out.parent / f".{out.name}.scoremerge-partial").is_dir()


def _restore_times(path, st):
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("change", ["rewritten", "replaced", "header"])
def test_resume_refuses_inputs_changed_with_size_and_mtime_restored(ws, change, monkeypatch):
    control = ws.root / "control"
    _interrupt_after_one_shard(ws, control, monkeypatch)
    code, err = ws.merge("stream", "--max-shard-size", "150B", "--resume", out=control)
    assert code == 0, err                         # unchanged inputs resume

    _interrupt_after_one_shard(ws, ws.out, monkeypatch)
    victim = ws.experts[0] / shard_name(2, 2)
    st = victim.stat()
    if change == "rewritten":
        _rewrite_in_place(victim)
    elif change == "replaced":
        _replace(victim)
    else:                                         # the header's bytes, same meaning and length
        data = victim.read_bytes()
        assert b'"dtype": "F32"' in data
        victim.write_bytes(data.replace(b'"dtype": "F32"', b'"dtype":"F32" ', 1))
    _restore_times(victim, st)
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    code, err = ws.merge("stream", "--max-shard-size", "150B", "--resume")
    assert_refused(code, err, "other inputs or settings")
    assert not ws.out.exists()


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


# ------------------------------------------------------------------ 10. fp16 overflow

@BOTH
def test_an_update_overflowing_fp16_is_refused_unless_allowed(ws, path):
    base = {"big": torch.full((4, 4), 60000.0, dtype=torch.float16),
            "small": torch.zeros(4, 4, dtype=torch.float16)}
    experts = [{"big": torch.full((4, 4), 90000.0, dtype=torch.bfloat16),
                "small": torch.full((4, 4), 0.5, dtype=torch.bfloat16)} for _ in range(2)]
    folder = ws.root / "in2"
    b = write_checkpoint(folder / "base", base)
    if path == "memory":                  # a .pt expert: the in-memory merge, with `mean`
        es = [folder / f"e{i}.pt" for i in range(2)]
        for p, sd in zip(es, experts):
            torch.save(sd, p)
        extra = ["--method", "mean"]
    else:
        es = [write_checkpoint(folder / f"e{i}", sd) for i, sd in enumerate(experts)]
        extra = []
    before = snapshot(folder)
    code, err = ws.merge(path, *extra, base=b, experts=es)
    assert_refused(code, err, "big", "float16")
    assert not ws.out.exists() and hidden_beside(ws.out) == []
    code, err = ws.merge(path, *extra, "--allow-nonfinite", base=b, experts=es)
    assert code == 0, err
    got = load_state_dict(ws.out)
    assert got["big"].dtype == torch.float16 and torch.isinf(got["big"]).all()
    assert torch.equal(got["small"], torch.full((4, 4), 0.5, dtype=torch.float16))
    assert snapshot(folder) == before
    if path == "stream":
        with pytest.raises(MergeInputError, match="'big'.*float16"):
            merge_checkpoints(b, es, ws.root / "api", "mean", progress=False)
        assert not (ws.root / "api").exists() and hidden_beside(ws.root / "api") == []
        merge_checkpoints(b, es, ws.root / "api", "mean", progress=False, allow_nonfinite=True)
        assert torch.isinf(load_state_dict(ws.root / "api")["big"]).all()
    else:
        with pytest.raises(MergeInputError, match="'big'.*float16"):
            api.merge(base, experts, "mean")
        assert torch.isinf(api.merge(base, experts, "mean", allow_nonfinite=True)["big"]).all()


# ------------------------------------------------------------------ 11. options, devices, configs

BAD_SETTINGS = [
    (["--method", "ties", "--option", "density=nan"], "density"),
    (["--method", "ties", "--option", "density=true"], "density"),
    (["--method", "iso_cts", "--option", "common_space_fraction=nan"], "common_space_fraction"),
    (["--method", "score", "--option", "trim_multiplier=nan"], "trim_multiplier"),
    (["--method", "score", "--option", "trim_multiplier=inf"], "trim_multiplier"),
    (["--method", "score", "--option", "trim_multiplier=-inf"], "trim_multiplier"),
    (["--alpha", "nan"], "alpha"),
    (["--alpha", "inf"], "alpha"),
    (["--device", "bogus"], "bogus"),
    (["--device", "meta"], "meta"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--device", "cpu:0:1"], "cpu:0:1"),
]


@BOTH
@pytest.mark.parametrize("args, named", BAD_SETTINGS, ids=[" ".join(a[-1:]) for a, _ in
                                                          BAD_SETTINGS])
def test_bad_options_and_devices_are_refused_before_anything_is_written(ws, path, args, named):
    experts = ws.experts
    if path == "memory":                     # a .pt expert: in memory whatever the method
        experts = [ws.inputs / "e1.pt", ws.experts[1]]
        torch.save(ws.expert_sds[0], experts[0])
    before, beside = ws.snap(), sorted(os.listdir(ws.root))
    code, err = ws.merge(None, *args, experts=experts)
    assert_refused(code, err, named)
    assert sorted(os.listdir(ws.root)) == beside and ws.snap() == before


def test_nan_options_and_bad_devices_through_the_api(ws):
    with pytest.raises(MergeInputError, match="density"):
        api.merge(ws.base_sd, ws.expert_sds, "ties", density=float("nan"))
    with pytest.raises(MergeInputError, match="common_space_fraction"):
        api.merge(ws.base_sd, ws.expert_sds, "iso_cts", common_space_fraction=float("nan"))
    with pytest.raises(MergeInputError, match="alpha"):
        api.merge(ws.base_sd, ws.expert_sds, "mean", alpha=float("nan"))
    for device in ("meta", "bogus"):
        with pytest.raises(MergeInputError, match=device):
            merge_checkpoints(ws.base, ws.experts, ws.out, "mean", device=device,
                              progress=False)
        with pytest.raises(MergeInputError, match=device):
            api.merge(ws.base_sd, ws.expert_sds, "mean", device=device)
    assert not ws.out.exists() and hidden_beside(ws.out) == []


def _config(ws, text, name="merge.yaml"):
    path = ws.root / name
    path.write_text(text)
    return path


def _run_config(ws, config, *extra):
    ws.capsys.readouterr()
    code = main(["merge", "--config", str(config), "--no-progress", *extra])
    return code, ws.capsys.readouterr().err


def test_nan_alpha_in_a_config_is_refused(ws):
    for text in (".nan", ".inf", "-.inf", "true"):
        config = _config(ws, f"base: in/base\nexperts: [in/e1, in/e2]\nout: out\nalpha: {text}\n")
        code, err = _run_config(ws, config)
        assert_refused(code, err, "alpha")
    config = _config(ws, json.dumps({"base": "in/base", "experts": ["in/e1"], "out": "out",
                                     "options": {"density": float("nan")}, "method": "ties"}),
                     "merge.json")
    code, err = _run_config(ws, config)
    assert_refused(code, err, "density")
    assert not ws.out.exists() and hidden_beside(ws.out) == []


def test_a_yaml_alias_bomb_is_refused_fast(ws):
    lines = ["base: in/base", "experts: [in/e1, in/e2]", "out: out", "options:",
             '  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"  l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    config = _config(ws, "\n".join(lines) + "\n")
    start = time.perf_counter()
    code, err = _run_config(ws, config)
    assert time.perf_counter() - start < 5
    assert_refused(code, err, "alias")
    merge_key = _config(ws, "defaults: &d {method: mean}\n<<: *d\nbase: in/base\n"
                            "experts: [in/e1]\nout: out\n", "merge2.yaml")
    code, err = _run_config(ws, merge_key)
    assert_refused(code, err, "alias")
    assert not ws.out.exists() and hidden_beside(ws.out) == []


MB = "x" * 1_000_000
LONG_VALUES = {
    "method": {"method": MB},
    "unknown_key": {MB: 1},
    "alpha": {"alpha": MB},
    "option_value": {"method": "ties", "options": {"density": MB}},
    "option_name": {"method": "ties", "options": {MB: 1}},
    "device": {"device": MB},
    "dtype": {"dtype": MB},
    "backend": {"backend": MB},
    "max_shard_size": {"max_shard_size": MB},
    "expert_entry": {"experts": [{"path": "in/e1", "weight": MB}]},
    "experts_not_list": {"experts": MB},
    "base_path": {"base": MB},
    "out_path": {"out": MB},
    "nested_path": {"base": "a/" * 400_000},
    "exclude_regex": {"exclude": ["(" * 400_000]},
}

@pytest.mark.parametrize("case", list(LONG_VALUES))
def test_a_megabyte_config_value_gives_a_short_message(ws, case):
    settings = {"base": "in/base", "experts": ["in/e1", "in/e2"], "out": "out"}
    config = _config(ws, json.dumps(settings | LONG_VALUES[case]), "merge.json")
    assert config.stat().st_size < 1 << 20
    code, err = _run_config(ws, config)
    assert_refused(code, err)
    assert len(err) < 500, err[:300]
    assert hidden_beside(ws.out) == [] and not ws.out.exists()


def test_oversized_and_deeply_nested_configs_are_refused(ws):
    big = _config(ws, "base: " + "x" * (1 << 20) + "\n")
    code, err = _run_config(ws, big)
    assert_refused(code, err, "KiB")
    for text in ("[" * 100_000, "{a: " * 50_000, "a:\n" + "".join(" " * i + "- \n"
                                                                   for i in range(2000))):
        code, err = _run_config(ws, _config(ws, text))
        assert_refused(code, err)
        assert len(err) < 500
    code, err = _run_config(ws, _config(ws, "[" * 100_000, "merge.json"))
    assert_refused(code, err)


# ------------------------------------------------------------------ 12. determinism

DETERMINISM_SCRIPT = """
    import sys
    from scoremerge.cli import main
    base, e1, e2, out = sys.argv[1:]
    for path, args in (("memory", ["--method", "ties"]),
                       ("stream", ["--method", "mean", "--stream"])):
        code = main(["merge", "--base", base, "--experts", e1, e2, "--out", f"{out}-{path}",
                     "--no-progress", "--max-shard-size", "150B", *args])
        assert code == 0, code
"""


def test_the_same_merge_gives_the_same_bytes(ws):
    outs = {}
    for path in PATH_ARGS:
        for run in (1, 2):
            out = ws.root / f"{path}-{run}"
            code, err = ws.merge(path, "--max-shard-size", "150B", out=out)
            assert code == 0, err
            outs[path, run] = all_bytes(out)
        assert INDEX in outs[path, 1] and len(outs[path, 1]) > 3
        assert outs[path, 1] == outs[path, 2], path
    # another process, another string hash seed
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(DETERMINISM_SCRIPT),
                           str(ws.base), *map(str, ws.experts), str(ws.root / "sub")],
                          capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(REPO), "PYTHONHASHSEED": "12345"})
    assert proc.returncode == 0, proc.stderr
    for path in PATH_ARGS:
        assert all_bytes(ws.root / f"sub-{path}") == outs[path, 1], path
    # the metadata's order does not depend on the caller's
    meta = {f"k{i}": str(i) for i in range(20)}
    a = save_state_dict(ws.base_sd, ws.root / "a", metadata=meta)
    b = save_state_dict(ws.base_sd, ws.root / "b", metadata=dict(reversed(meta.items())))
    assert all_bytes(a) == all_bytes(b)


# ------------------------------------------------------------------ 13. SIGINT, SIGTERM, SIGKILL

SITECUSTOMIZE = """
    import os, time
    if os.environ.get("SCOREMERGE_TEST_SLOW_PUT"):
        from scoremerge.io import shard_writer
        _delay, _put = float(os.environ["SCOREMERGE_TEST_SLOW_PUT"]), shard_writer.ShardWriter.put
        def put(self, *args, **kwargs):
            time.sleep(_delay)
            _put(self, *args, **kwargs)
        shard_writer.ShardWriter.put = put
"""


def _signal_inputs(ws):
    base = base_model(0, n=12, shape=(16, 16))
    sds = [expert_of(base, s) for s in (1, 2)]
    folder = ws.root / "in3"
    return (write_checkpoint(folder / "base", base, shards=3),
            [write_checkpoint(folder / f"e{i}", sd, shards=2) for i, sd in enumerate(sds)])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL, None],
                         ids=["SIGINT", "SIGTERM", "SIGKILL", "no-signal"])
def test_a_signalled_streaming_merge_keeps_its_shards_and_resumes(ws, tmp_path, sig):
    base, experts = _signal_inputs(ws)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    def argv(out, *extra):
        return ["merge", "--base", str(base), "--experts", *map(str, experts), "--out",
                str(out), "--method", "mean", "--stream", "--max-shard-size", "2KiB",
                "--no-progress", *extra]

    before = snapshot(ws.root / "in3")
    proc = subprocess.Popen([sys.executable, "-m", "scoremerge", *argv(ws.out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": f"{site}{os.pathsep}{REPO}",
                                              "SCOREMERGE_TEST_SLOW_PUT": "0.1"})
    partial = ws.root / ".out.scoremerge-partial"
    try:
        deadline = time.monotonic() + 60
        while not (partial.is_dir() and any(p.name.startswith("model-")
                                            for p in partial.iterdir())):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no shard completed"
            time.sleep(0.02)
        code, err = ws.run(argv(ws.out))             # a second run meanwhile: refused
        assert_refused(code, err, "another scoremerge run is writing")
        if sig is not None:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    if sig is None:
        assert proc.returncode == 0, err
    elif sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert (ws.root / ".out.scoremerge-lock").exists()     # left by the dead run
    else:
        assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
        assert len(err.strip().splitlines()) == 1 and "--resume" in err, err
        assert err.startswith("scoremerge: interrupted")
    if sig is not None:
        assert partial.is_dir() and not ws.out.exists()
        code, err = ws.run(argv(ws.out, "--resume"))
        assert code == 0, err
        reused = int(re.search(r"(\d+) shard\(s\) reused", ws.stdout).group(1))
        assert reused >= 1, ws.stdout
    whole = ws.root / "whole"
    code, err = ws.run(argv(whole))
    assert code == 0, err
    assert all_bytes(ws.out) == all_bytes(whole)
    assert hidden_beside(ws.out) == [] and snapshot(ws.root / "in3") == before


def test_a_fresh_run_after_a_killed_one_starts_over(ws, monkeypatch):
    _interrupt_after_one_shard(ws, ws.out, monkeypatch)
    (ws.root / ".out.scoremerge-lock").touch()          # as a SIGKILLed run leaves it
    code, err = ws.merge("stream", "--max-shard-size", "150B")
    assert code == 0, err
    same_values(load_state_dict(ws.out), ws.want("stream"))
    assert hidden_beside(ws.out) == []


# ------------------------------------------------------------------ 14. our own failures

@BOTH
def test_an_internal_error_is_one_line_and_exit_1(ws, path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    for name in ("merge", "merge_checked"):      # the public call, and the CLI's, if apart
        if hasattr(api, name):
            monkeypatch.setattr(api, name, broken)
    before = ws.snap()
    code, err = ws.merge(path)
    assert code == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "internal error" in err and "boom" in err
    assert not ws.out.exists() and ws.snap() == before
    assert ".out.scoremerge-lock" not in hidden_beside(ws.out)
    assert not any(".tmp-" in name for name in hidden_beside(ws.out))


def test_an_in_memory_merge_interrupted_writes_nothing(ws, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for name in ("merge", "merge_checked"):
        if hasattr(api, name):
            monkeypatch.setattr(api, name, interrupted)
    code, err = ws.merge("memory")
    assert code == 130 and err.strip() == "scoremerge: interrupted; nothing was written", err
    assert not ws.out.exists() and hidden_beside(ws.out) == []
