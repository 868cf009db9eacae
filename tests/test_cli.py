"""The command line end to end on small checkpoints written by the tests; bad input exits 2,
names what is wrong, and writes nothing."""
import json
import re

import pytest
import torch

import scoremerge
from scoremerge.cli import main
from scoremerge.io import load_state_dict, save_state_dict

from conftest import random_task_vectors

SHAPES = {"enc.w": (24, 16), "enc.b": (24,), "head.w": (5, 24)}


@pytest.fixture
def checkpoints(tmp_path):
    base = random_task_vectors(SHAPES, 1, seed=0, dtype=torch.float32)[0]
    base["ids"] = torch.arange(4)
    paths = [tmp_path / "base"]
    save_state_dict(base, paths[0], max_shard_size="1KB")          # a sharded HF folder
    (paths[0] / "config.json").write_text('{"hidden": 24}')
    for t, tau in enumerate(random_task_vectors(SHAPES, 3, seed=1, scale=0.1)):
        expert = {k: base[k] + tau[k].float() for k in SHAPES} | {"ids": torch.arange(4)}
        paths.append(tmp_path / f"expert{t}.safetensors")
        save_state_dict(expert, tmp_path / f"e{t}")
        (tmp_path / f"e{t}" / "model.safetensors").rename(paths[-1])
    return tmp_path, [str(p) for p in paths]


def run(paths, out, *extra):
    return main(["merge", "--base", paths[0], "--experts", *paths[1:], "--out", str(out),
                 "--no-progress", *extra])


def test_merge_end_to_end_equals_the_api(checkpoints, capsys):
    tmp, paths = checkpoints
    code = run(paths, tmp / "out", "--method", "score", "--alpha", "0.5", "--option",
               "variant=diag", "trim_multiplier=2", "--exclude", "head")
    assert code == 0 and "merged 3 experts with score" in capsys.readouterr().out
    merged = load_state_dict(tmp / "out")
    models = [load_state_dict(p) for p in paths]
    want = scoremerge.merge(models[0], models[1:], "score", alpha=0.5, variant="diag",
                            trim_multiplier=2.0, exclude=["head"])
    assert set(merged) == set(want) and all(torch.equal(merged[k], want[k]) for k in want)
    assert json.loads((tmp / "out" / "config.json").read_text()) == {"hidden": 24}
    from safetensors import safe_open
    with safe_open(tmp / "out" / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["method"] == "score" and json.loads(meta["options"])["variant"] == "diag"


def test_progress_bar_goes_to_stderr(checkpoints, capsys):
    tmp, paths = checkpoints
    assert main(["merge", "--base", paths[0], "--experts", *paths[1:], "--out", str(tmp / "o"),
                 "--method", "tsv"]) == 0
    assert "merge (tsv)" in capsys.readouterr().err


def test_methods_lists_options(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "--option variant=full (full | diag | offdiag | untrimmed)" in out and "iso_cts" in out


@pytest.mark.parametrize("setup,args,message", [
    (None, ["--method", "tiess"], "unknown method 'tiess'.*did you mean 'ties'"),
    (None, ["--option", "densty=0.3", "--method", "ties"], "unknown option 'densty'.*'density'"),
    (None, ["--option", "variant"], "--option 'variant' is not KEY=VALUE"),
    (None, ["--max-shard-size", "huge"], "not a positive size"),
    (lambda d, p: p.append(str(d / "nothing.safetensors")), [], r"nothing\.safetensors: no such file"),
    (lambda d, p: ((d / "bad.safetensors").write_bytes(b"\x00" * 12), p.append(str(d / "bad.safetensors"))),
     [], r"bad\.safetensors: not a readable safetensors file"),
    (lambda d, p: (save_state_dict({"enc.w": torch.ones(24, 16)}, d / "small"), p.append(str(d / "small"))),
     [], r"expert .*small does not have the keys of base .*base: missing 3 key\(s\)"),
    (lambda d, p: (save_state_dict({"enc.w": torch.ones(16, 24), "enc.b": torch.ones(24),
                                    "head.w": torch.ones(5, 24), "ids": torch.arange(4)}, d / "t"),
                   p.append(str(d / "t"))), [], r"shape mismatch at key 'enc.w'"),
    (lambda d, p: (save_state_dict({"enc.w": torch.full((24, 16), float("nan")), "enc.b": torch.ones(24),
                                    "head.w": torch.ones(5, 24), "ids": torch.arange(4)}, d / "n"),
                   p.append(str(d / "n"))), [], r"key 'enc.w' of expert .*n contains NaN"),
])
def test_bad_input_exits_2_and_writes_nothing(checkpoints, capsys, setup, args, message):
    tmp, paths = checkpoints
    if setup:
        setup(tmp, paths)
    before = sorted(p.name for p in tmp.iterdir())
    assert run(paths, tmp / "out", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("scoremerge: error: ")
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp.iterdir()) == before


def test_too_few_experts_and_existing_output(checkpoints, capsys):
    tmp, paths = checkpoints
    with pytest.raises(SystemExit) as exit_info:        # argparse: --experts needs one or more
        main(["merge", "--base", paths[0], "--experts", "--out", str(tmp / "o")])
    assert exit_info.value.code == 2 and "--experts: expected at least one" in capsys.readouterr().err
    (tmp / "taken").mkdir()
    (tmp / "taken" / "keep.txt").write_text("mine")
    assert run(paths, tmp / "taken") == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp / "taken" / "keep.txt").read_text() == "mine"


def test_example_runs_every_method(tmp_path, capsys):
    assert main(["example", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in scoremerge.methods():
        assert method in out
        assert (tmp_path / "merged" / method / "model.safetensors").is_file()
