"""The workspace, hand-built files and probes shared by the hostile-input tests
(tests/test_hostile_*.py). Every crafted file is built by those tests, byte by byte where it
matters (headers from struct.pack('<Q', n) + JSON + data), with symlinks, YAML aliases and racing
processes. For each case: the exit code of `scoremerge merge`, on the in-memory path (`--method
ties`, whose global scope cannot stream, or a .pt expert) and on the streaming path (`--stream`)
where both apply; a one-line message naming the cause; every file under the inputs' folder
byte-identical afterwards; and, when the input was bad, nothing left beside --out (no partial,
lock or temporary folder)."""
import hashlib
import json
import os
import signal
import struct
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from scoremerge import api
from scoremerge.cli import main

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
