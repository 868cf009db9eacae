"""mergekit's own YAML through `scoremerge merge --config` against the real mergekit 0.1.5
(`run_merge`, what `mergekit-yaml` runs) on the same tiny Llama files: the written tensors must
be equal bit for bit (float32 compute) for linear, task_arithmetic and ties with weights,
densities, lambda and normalize; every field scoremerge does not reproduce is refused by name."""
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

import scoremerge
from scoremerge.cli import main
from scoremerge.io import load_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from llama_checkpoints import write_llama_family  # noqa: E402

try:
    import mergekit  # noqa: F401
    HAVE_MERGEKIT = True
except ModuleNotFoundError:
    if "CI" in os.environ:                     # CI installs mergekit: missing is a failure
        raise
    HAVE_MERGEKIT = False
needs_mergekit = pytest.mark.skipif(not HAVE_MERGEKIT,
                                    reason="mergekit is not installed (pip install mergekit==0.1.5)")

CASES = {
    "linear-weighted": ("linear", [0.5, 0.2, 0.3], {}, {}),
    "linear-unnormalized": ("linear", [0.5, 1.25, -0.3], {}, {"normalize": False}),
    "task_arithmetic": ("task_arithmetic", [0.7, 0.4, 1.1], {}, {"lambda": 0.8}),
    "task_arithmetic-normalize": ("task_arithmetic", [0.7, 0.4, 1.1], {}, {"normalize": True}),
    "ties": ("ties", [1.0, 0.6, 0.9], [0.5, 0.3, 0.7], {}),
    "ties-unnormalized-lambda": ("ties", [1.0, 0.6, 0.9], [0.5, 0.5, 0.5],
                                 {"normalize": False, "lambda": 1.3}),
    "ties-shared-density": ("ties", [1.0, 1.0, 1.0], {}, {"density": 0.4}),
}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_llama_family(tmp_path_factory.mktemp("llama"), layers=2, hidden=64,
                              intermediate=96, vocab=128, heads=4, experts=3, update=0.5)


def mergekit_config(method, folders, weights, densities, parameters):
    models = []
    for i, folder in enumerate(folders[1:]):
        params = {"weight": weights[i]}
        if isinstance(densities, list):
            params["density"] = densities[i]
        models.append({"model": str(folder), "parameters": params})
    base = {} if method == "linear" else {"base_model": str(folders[0])}   # linear: no base
    return {"merge_method": method, **base, "dtype": "float32", "models": models,
            **({"parameters": parameters} if parameters else {})}


def scoremerge_config_merge(cfg, tmp_path, capsys, *extra):
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["merge", "--config", str(path), "--out", str(tmp_path / "ours"), "--no-progress",
                 *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return load_state_dict(tmp_path / "ours"), captured


@needs_mergekit
@pytest.mark.parametrize("case", list(CASES))
def test_mergekit_config_gives_mergekits_result_to_the_bit(family, tmp_path, capsys, case):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    cfg = mergekit_config(CASES[case][0], family, *CASES[case][1:])
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "theirs"),
              options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    theirs = load_state_dict(tmp_path / "theirs")
    ours, _ = scoremerge_config_merge(cfg, tmp_path, capsys)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), (key, (ours[key] - theirs[key]).abs().max())


def test_ties_config_records_mergekits_conventions(family, tmp_path, capsys):
    from safetensors import safe_open
    cfg = mergekit_config("ties", family, [1.0, 0.6, 0.9], [0.5, 0.3, 0.7], {})
    _, captured = scoremerge_config_merge(cfg, tmp_path, capsys)
    assert "mergekit config: ties with mergekit's conventions" in captured.err
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["config_schema"] == "mergekit" and meta["weights"] == "[1.0, 0.6, 0.9]"
    options = yaml.safe_load(meta["options"])
    assert options["trim"] == "exact" and options["scope"] == "tensor" and \
        options["zero_sign"] == "plus" and options["density"] == [0.5, 0.3, 0.7]


def test_scoremerge_method_in_a_mergekit_config(family, tmp_path, capsys):
    cfg = mergekit_config("score", family, [0.5, 1.0, 2.0], {},
                          {"variant": "diag", "lambda": 0.7})
    ours, _ = scoremerge_config_merge(cfg, tmp_path, capsys)
    base, experts = load_state_dict(family[0]), [load_state_dict(f) for f in family[1:]]
    want = scoremerge.merge(base, experts, "score", weights=[0.5, 1.0, 2.0], alpha=0.7,
                            variant="diag")
    assert all(torch.equal(ours[k], want[k]) for k in want)


def test_paths_are_relative_to_the_current_folder(family, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(family[0].parent)
    cfg = mergekit_config("task_arithmetic", [Path(f.name) for f in family], [1, 1, 1], {}, {})
    elsewhere = tmp_path / "configs"
    elsewhere.mkdir()
    ours, _ = scoremerge_config_merge(cfg, elsewhere, capsys)
    base, experts = load_state_dict(family[0]), [load_state_dict(f) for f in family[1:]]
    want = scoremerge.merge(base, experts, "task_arithmetic")
    assert all(torch.equal(ours[k], want[k]) for k in want)


@pytest.mark.parametrize("change, match", [
    ({"slices": [{"sources": []}]}, r"slices: slices \(layer_range frankenmerges\) are not "),
    ({"merge_method": "dare_ties"}, r"merge_method: 'dare_ties' is not one scoremerge runs"),
    ({"tokenizer_source": "union"}, r"tokenizer_source: 'union' is not supported"),
    ({"chat_template": "chatml"}, r"chat_template is not supported"),
    ({"out_dtype": "bfloat16"}, r"out_dtype: scoremerge writes each tensor in the base"),
    ({"dtype": "int8"}, r"dtype: 'int8' is not a dtype scoremerge computes in"),
    ({"base_model": "meta-llama/Llama-2-7b-hf"}, r"is not a local path .*hf download"),
    ({"base_model": "BASE@v1"}, r"revisions are not supported"),
    ({"base_model": "BASE+some/lora"}, r"model\+lora references are not supported"),
    ({"parameters": {"density": [0.1, 0.9]}}, r"parameters.density: gradients .* are not"),
    ({"parameters": {"density": {"filter": "mlp", "value": 0.5}}}, r"filtered values"),
    ({"parameters": {"rescale": True}}, r"rescale: true is not supported"),
    ({"parameters": {"epsilon": 0.1}}, r"'epsilon' is not a parameter of mergekit's ties"),
    ({"models": "x"}, r"models: must be a non-empty list"),
    ({"extra_key": 1}, r"'extra_key' is not a mergekit config key"),
    ({"models": [{"model": "BASE", "parameters": {"gamma": 1}}]},
     r"'gamma' is not a per-model parameter of mergekit's ties"),
])
def test_what_scoremerge_does_not_reproduce_is_refused_by_name(family, tmp_path, capsys, change,
                                                                 match):
    cfg = mergekit_config("ties", family, [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], {})
    for key, value in change.items():
        if isinstance(value, str):
            value = value.replace("BASE", str(family[0]))
        if key == "models" and isinstance(value, list):
            value = [{**m, "model": m["model"].replace("BASE", str(family[1]))} for m in value]
        cfg[key] = value
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["merge", "--config", str(path), "--out", str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:" in err and __import__("re").search(match, err), err
    assert not (tmp_path / "ours").exists()


@needs_mergekit
def test_score_inside_mergekit_equals_scoremerge_merge_config(family, tmp_path, capsys):
    """The same YAML with `merge_method: score`: `scoremerge mergekit` (mergekit's pipeline with
    register()) and `scoremerge merge --config` write the same tensors."""
    cfg = mergekit_config("score", family, [0.5, 1.0, 2.0], {}, {"variant": "diag"})
    ours, _ = scoremerge_config_merge(cfg, tmp_path, capsys)
    assert main(["mergekit", str(tmp_path / "mergekit.yml"), str(tmp_path / "inside")]) == 0
    inside = load_state_dict(tmp_path / "inside")
    assert all(torch.equal(inside[k], ours[k]) for k in ours)
