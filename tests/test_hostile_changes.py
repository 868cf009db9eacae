"""Inputs changed while read, and merges interrupted by signals. See tests/hostile.py for what every
case checks."""

import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time

import pytest

from scoremerge import MergeInputError
from scoremerge.io import load_state_dict, shard_writer
from scoremerge.io.checkpoint import Checkpoint
from scoremerge.streaming import merge_checkpoints

# ws is a fixture: pytest finds it by the name the tests take
from hostile import (REPO, BOTH, shard_name, write_checkpoint, base_model, expert_of, snapshot,
                     hidden_beside, assert_refused, all_bytes, same_values, ws)  # noqa: F401


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


# ------------------------------------------------------------------ 13. SIGINT, SIGTERM, SIGKILL

SITECUSTOMIZE = """
    import os, time
    if os.environ.get("SCOREMERGE_TEST_SLOW_PUT"):
        from scoremerge.io import shard_writer
        _delay, _put = float(os.environ["SCOREMERGE_TEST_SLOW_PUT"]), shard_writer.ShardWriter.put
        _hold = os.environ.get("SCOREMERGE_TEST_HOLD")
        def put(self, *args, **kwargs):
            time.sleep(_delay)
            # once a shard is complete, later puts wait while the hold file exists: the test
            # signals a run that is surely still merging, however fast the machine
            while _hold and os.path.exists(_hold) and any(
                    p.name.startswith("model-") for p in self.path.parent.iterdir()):
                time.sleep(0.02)
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
    hold = tmp_path / "hold"
    hold.touch()
    # SIGINT at its default in the child: a runner started in the background (`cmd &` in a
    # script) ignores SIGINT, its children inherit that, and Python then installs no handler
    proc = subprocess.Popen([sys.executable, "-m", "scoremerge", *argv(ws.out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONPATH": f"{site}{os.pathsep}{REPO}",
                                              "SCOREMERGE_TEST_SLOW_PUT": "0.1",
                                              "SCOREMERGE_TEST_HOLD": str(hold)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
            time.sleep(0.3)                             # handled before the writer may go on
        hold.unlink()
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
