"""Hostile values and settings: fp16 overflow, options, devices and configs, determinism,
scoremerge's own failures. See tests/hostile.py for what every case checks."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from scoremerge import MergeInputError, api
from scoremerge.cli import main
from scoremerge.io import load_state_dict, save_state_dict
from scoremerge.streaming import merge_checkpoints

# ws is a fixture: pytest finds it by the name the tests take
from hostile import (REPO, INDEX, PATH_ARGS, BOTH, write_checkpoint, snapshot, hidden_beside,
                     assert_refused, all_bytes, ws)  # noqa: F401


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
