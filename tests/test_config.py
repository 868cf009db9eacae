"""`scoremerge merge --config FILE`: YAML and JSON files written by the tests, every validation
error by its message, relative paths, command-line overrides, and the flag <-> key map."""
import dataclasses
import json

import pytest

from scoremerge import cli, config
from scoremerge.config import CLI_UNSET, FILE_KEYS, MergeSettings, merge_settings, \
    merge_settings_from
from scoremerge.errors import MergeInputError
from scoremerge.methods import get

FULL = """
base: models/base
experts:
  - models/a
  - path: /abs/b
method: score
options: {variant: diag, trim_multiplier: 2.0}
alpha: 0.5
exclude: ["lm_head", "embed"]
dtype: float64
device: cpu
backend: torch
max_shard_size: 1GB
max_gpu_memory: 20GB
out: merged/
overwrite: true
no_progress: true
resume: true
stream: true
"""


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _merge_subparser():
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if a.choices and "merge" in a.choices)
    return parser, subparsers.choices["merge"]


def _cli(argv):
    """The real `merge` parser with the integration merge_settings_from's docstring asks of
    cli.py: --config, untyped flags None, --base/--experts/--out no longer required."""
    parser, merge = _merge_subparser()
    if "--config" not in merge._option_string_actions:
        merge.add_argument("--config")
    for action in merge._actions:
        action.required = False
    merge.set_defaults(**CLI_UNSET)
    return merge_settings_from(parser.parse_args(["merge", *argv]))


def test_full_yaml_file_round_trip(tmp_path):
    s = merge_settings(_write(tmp_path, FULL))
    assert s == MergeSettings(
        base=str(tmp_path / "models/base"), experts=(str(tmp_path / "models/a"), "/abs/b"),
        out=str(tmp_path / "merged"), weights=None, method="score", alpha=0.5,
        exclude=("lm_head", "embed"),
        option={"variant": "diag", "trim_multiplier": 2.0, "trim_per_task": True},
        device="cpu", dtype="float64", backend="torch", max_shard_size="1GB",
        max_gpu_memory="20GB", overwrite=True, no_progress=True, resume=True, stream=True)


def test_json_file_equals_yaml(tmp_path):
    import yaml
    as_json = _write(tmp_path, json.dumps(yaml.safe_load(FULL)), "cfg.json")
    assert merge_settings(as_json) == merge_settings(_write(tmp_path, FULL))


def test_minimal_file_takes_the_cli_defaults(tmp_path):
    s = merge_settings(_write(tmp_path, "base: b\nexperts: [e]\nout: o\n", "cfg.yml"))
    assert (s.method, s.alpha, s.exclude, s.backend, s.max_shard_size, s.dtype) == \
        ("score", 1.0, (), "auto", "5GB", None)
    assert s.option == get("score").defaults


def test_relative_paths_resolve_against_the_file_folder(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    _write(tmp_path / "configs", "base: ../models/base\nexperts: [a, ~/b, /abs/c]\nout: out\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/u")
    s = merge_settings("configs/cfg.yaml")
    assert s.base == "configs/../models/base"
    assert s.experts == ("configs/a", "/home/u/b", "/abs/c")
    assert s.out == "configs/out"


ERRORS = [
    ("metod: score\n", r"unknown key 'metod' .*did you mean 'method'\?"),
    ("alpha: true\n", r"alpha: must be a finite number, got True"),
    ("alpha: '1.0'\n", r"alpha: must be a finite number, got '1.0'"),
    ("alpha: .inf\n", r"alpha: must be a finite number, got inf"),
    ("base: null\n", r"base: must be a non-empty string, got None"),
    ("experts: []\n", r"experts: must be a non-empty list of expert paths"),
    ("experts: models/a\n", r"experts: must be a non-empty list"),
    ("experts: [a, 3]\n", r"experts\[1\]: must be a non-empty string, got 3"),
    ("experts: [{path: a, weight: 1}, {path: b, weight: .nan}]\n",
     r"experts\[1\]\.weight: must be a finite number, got nan"),
    ("experts: [{path: a, weight: 1}, {path: b, weight: '0.5'}]\n",
     r"experts\[1\]\.weight: must be a finite number, got '0.5'"),
    ("experts: [{path: a, weight: 1}, b]\n",
     r"experts\[1\]: has no weight while other experts have one"),
    ("experts: [{path: a, wieght: 1}]\n",
     r"experts\[0\]: unknown key 'wieght' .*did you mean 'weight'\?"),
    ("experts: [{weight: 1}]\n", r"experts\[0\]: missing 'path'"),
    ("experts: [a, b]\nweights: [1, 2, 3]\n", r"weights: one weight per expert: 2 expert\(s\), 3"),
    ("experts: [a, b]\nweights: 0.5\n", r"weights: must be a list of numbers"),
    ("experts: [{path: a, weight: 1}, {path: b, weight: 2}]\nweights: [1, 2]\n",
     r"weights are given twice"),
    ("method: scor\n", r"method: unknown method 'scor' .*did you mean 'score'\?"),
    ("options: {variant: diagonal}\n",
     r"options: option 'variant' of method 'score' must be one of .*got 'diagonal'"),
    ("options: {trim_multipler: 2}\n",
     r"options: unknown option 'trim_multipler' .*did you mean 'trim_multiplier'\?"),
    ("options: {trim_multiplier: abc}\n",
     r"options: option 'trim_multiplier' of method 'score' takes a float, got 'abc'"),
    ("options: [variant=diag]\n", r"options: must be a mapping of option names to values"),
    ("exclude: lm_head\n", r"exclude: must be a list of regular expressions"),
    ("exclude: ['(']\n", r"exclude\[0\]: '\(' is not a regular expression"),
    ("dtype: float16\n", r"dtype: must be one of float32, float64, got 'float16'"),
    ("backend: gpu\n", r"backend: must be one of auto, cuda, triton, torch, reference, got 'gpu'"),
    ("device: 0\n", r"device: must be a non-empty string, got 0"),
    ("max_shard_size: 5XB\n", r"max_shard_size: size '5XB' is not a positive size"),
    ("max_gpu_memory: -1GB\n", r"max_gpu_memory: size '-1GB' is not a positive size"),
    ("max_gpu_memory: true\n", r"max_gpu_memory: must be a size such as 5GB, got True"),
    ("overwrite: 1\n", r"overwrite: must be true or false, got 1"),
    ("stream: 'no'\n", r"stream: must be true or false, got 'no'"),
]


@pytest.mark.parametrize("override, match", ERRORS, ids=[e[0].split(":")[0] for e in ERRORS])
def test_bad_field_names_file_field_and_problem(tmp_path, override, match):
    # a valid file with one key replaced
    valid = {"base": "base: b\n", "experts": "experts: [e1, e2]\n", "out": "out: o\n"}
    valid[override.split(":")[0]] = override
    cfg = _write(tmp_path, "".join(valid.values()))
    with pytest.raises(MergeInputError, match=match) as error:
        merge_settings(cfg)
    assert str(error.value).startswith(f"{cfg}: ")


@pytest.mark.parametrize("missing", ["base", "experts", "out"])
def test_missing_required_key(tmp_path, missing):
    keys = {"base": "base: b\n", "experts": "experts: [e]\n", "out": "out: o\n"}
    del keys[missing]
    cfg = _write(tmp_path, "".join(keys.values()))
    with pytest.raises(MergeInputError, match=rf"{cfg}: missing required key '{missing}' "
                                              rf"\(or give --{missing}\)"):
        merge_settings(cfg)


@pytest.mark.parametrize("name, text, match", [
    ("cfg.yaml", "base: b\nexperts: [e]\nout: o: p\n",
     r"cfg\.yaml:3:7: not valid YAML: mapping values are not allowed here"),
    ("cfg.yaml", "base: b\n  bad: indent\n", r"cfg\.yaml:2:6: not valid YAML"),
    ("cfg.json", '{"base": "b",\n}', r"cfg\.json:2:1: not valid JSON"),
    ("cfg.yaml", "- b\n- e\n", r"cfg\.yaml: must be a mapping of settings .*got list"),
    ("cfg.json", "[]", r"cfg\.json: must be a mapping of settings .*got list"),
    ("cfg.yaml", "", r"cfg\.yaml: must be a mapping of settings .*got an empty file"),
    ("cfg.toml", "base = 'b'", r"cfg\.toml: a config file must end in \.yaml, \.yml or \.json"),
])
def test_unreadable_file(tmp_path, name, text, match):
    with pytest.raises(MergeInputError, match=match):
        merge_settings(_write(tmp_path, text, name))


def test_missing_file(tmp_path):
    with pytest.raises(MergeInputError, match=r"nope\.yaml: cannot read the config file"):
        merge_settings(tmp_path / "nope.yaml")


def test_weights_from_the_experts_a_list_or_the_command_line(tmp_path):
    cfg = _write(tmp_path, "base: b\nexperts: [{path: a, weight: 0.3}, {path: c, weight: 1}]\n"
                           "out: o\n")
    assert merge_settings(cfg).weights == (0.3, 1.0)
    cfg = _write(tmp_path, "base: b\nexperts: [a, c]\nweights: [2, -1]\nmethod: ties\n"
                           "options: {density: [0.5, 0.25]}\nout: o\n")
    s = merge_settings(cfg)
    assert s.weights == (2.0, -1.0) and s.option["density"] == (0.5, 0.25)
    assert _cli(["--config", str(cfg), "--weights", "1", "3"]).weights == (1.0, 3.0)
    with pytest.raises(MergeInputError, match=r"density.*2 values, one per expert; got 3"):
        _cli(["--config", str(cfg), "--option", "density=0.1,0.2,0.3"])


def test_command_line_overrides_the_file(tmp_path, monkeypatch):
    cfg = _write(tmp_path, "base: base\nexperts: [a, b]\nmethod: ties\nalpha: 0.5\n"
                           "options: {density: 0.3, scope: tensor}\nout: out\noverwrite: true\n")
    monkeypatch.chdir(tmp_path.parent)
    s = _cli(["--config", str(cfg), "--alpha", "2", "--option", "density=0.5",
              "--out", "elsewhere", "--experts", "x"])
    assert s.alpha == 2.0 and s.method == "ties"
    assert s.option == {"density": 0.5, "scope": "tensor", "disjoint": "mean",
                        "zero_sign": "zero", "trim": "threshold"}                     # --option: key by key
    assert s.out == "elsewhere" and s.experts == ("x",)           # command line: as typed
    assert s.base == str(tmp_path / "base")                       # file: from its folder
    assert s.overwrite is True                                    # not typed: the file's


def test_command_line_alone_is_validated_the_same_way():
    s = _cli(["--base", "b", "--experts", "e1", "e2", "--out", "o"])
    assert s == MergeSettings(base="b", experts=("e1", "e2"), out="o",
                              option=get("score").defaults)
    with pytest.raises(MergeInputError, match=r"^--out is required \(or give it in a --config"):
        _cli(["--base", "b", "--experts", "e"])
    with pytest.raises(MergeInputError, match=r"^--max-shard-size: size '0GB' is not a positive"):
        _cli(["--base", "b", "--experts", "e", "--out", "o", "--max-shard-size", "0GB"])
    with pytest.raises(MergeInputError, match=r"^--option: unknown option 'densty'"):
        _cli(["--base", "b", "--experts", "e", "--out", "o", "--option", "densty=1"])
    with pytest.raises(MergeInputError, match=r"^--option 'density' is not KEY=VALUE"):
        _cli(["--base", "b", "--experts", "e", "--out", "o", "--option", "density"])


def test_cli_flags_and_file_keys_map_one_to_one():
    _, merge = _merge_subparser()
    flags = {a.dest: a.option_strings for a in merge._actions if a.option_strings}
    flags.pop("help")
    flags.pop("config", None)           # names the file; not a setting in it
    assert set(flags) == set(FILE_KEYS)
    for dest, options in flags.items():  # error labels spell a flag from its dest
        assert "--" + dest.replace("_", "-") in options
    fields = {f.name for f in dataclasses.fields(MergeSettings)}
    assert fields == set(FILE_KEYS) | {"schema", "notes"}     # what reading a mergekit config says
    assert set(config._CHECKS) | {"experts", "weights"} == set(FILE_KEYS)
