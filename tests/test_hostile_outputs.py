"""Hostile outputs: --out against the inputs, --overwrite, two runs into one --out. See
tests/hostile.py for what every case checks."""

import os
import subprocess
import sys
import textwrap

import pytest

from scoremerge import MergeInputError
from scoremerge.cli import main
from scoremerge.io import load_state_dict, save_state_dict
from scoremerge.io.access import output_lock
from scoremerge.io.checkpoint import Checkpoint
from scoremerge.streaming import merge_checkpoints

# ws is a fixture: pytest finds it by the name the tests take
from hostile import (REPO, PATH_ARGS, BOTH, st_bytes, write_checkpoint, snapshot, hidden_beside,
                     assert_refused, all_bytes, same_values, ws)  # noqa: F401


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

    def racing(self, *args, **kwargs):
        if not second:
            second.append(None)
            second[0] = ws.merge(path)           # a second `scoremerge merge` into the same --out
        return real(self, *args, **kwargs)

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
