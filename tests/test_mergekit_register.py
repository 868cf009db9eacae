"""scoremerge's methods inside the real mergekit 0.1.5 (scoremerge.integrations.mergekit).

A tiny Llama family (bench/llama_checkpoints.py: real key names and config.json, fp32, a base and
three experts) is merged by mergekit's own pipeline (run_merge, and `mergekit-yaml` through
run_mergekit) with `merge_method: score` etc. after register(); the written tensors must equal
scoremerge.merge on the same files bit for bit: mergekit loads them in `dtype: float32`, and each
per-tensor task computes the same float32 task vectors and calls the same ops as scoremerge.
"""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

try:
    import mergekit  # noqa: F401
except ModuleNotFoundError:
    if "CI" in os.environ:                     # CI installs mergekit: missing is a failure
        raise
    pytest.skip("mergekit is not installed (pip install mergekit==0.1.5)", allow_module_level=True)

import yaml
from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

import scoremerge
from scoremerge.integrations.mergekit import METHODS, register, run_mergekit
from scoremerge.io import load_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from llama_checkpoints import write_llama_family  # noqa: E402

CASES = [("score", {}), ("score", {"variant": "diag", "trim_multiplier": 1.5}), ("tsv", {}),
         ("iso_c", {}), ("iso_cts", {"common_space_fraction": 0.5}), ("magmax", {})]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """(folders, base state dict, expert state dicts)."""
    folders = write_llama_family(tmp_path_factory.mktemp("llama"), layers=2, hidden=64,
                                 intermediate=96, vocab=128, heads=4, experts=3, update=0.5)
    register()
    return folders, load_state_dict(folders[0]), [load_state_dict(f) for f in folders[1:]]


def config(method, folders, parameters=None, weights=None):
    models = [{"model": str(f)} for f in folders[1:]]
    for m, w in zip(models, weights or ()):
        m["parameters"] = {"weight": w}
    return {"merge_method": method, "base_model": str(folders[0]), "dtype": "float32",
            "models": models, **({"parameters": parameters} if parameters else {})}


def mergekit_merge(cfg, out):
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              options=MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return load_state_dict(out)


def assert_equal(got, want):
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("method,options", CASES, ids=[f"{m}-{'-'.join(o) or 'defaults'}"
                                                        for m, o in CASES])
def test_mergekit_run_merge_equals_scoremerge(family, tmp_path, method, options):
    folders, base, experts = family
    got = mergekit_merge(config(method, folders, options), tmp_path / "out")
    assert_equal(got, scoremerge.merge(base, experts, method, **options))


def test_options_reach_the_method(family):
    _, base, experts = family
    key = "model.layers.0.self_attn.q_proj.weight"
    tensors = [base[key]] + [e[key] for e in experts]
    diag = merge_methods.merge_tensors(tensors, "score", base_index=0, name=key,
                                       parameters={"variant": "diag"})
    one = [{key: e[key]} for e in experts]
    assert torch.equal(diag, scoremerge.merge({key: base[key]}, one, "score", variant="diag")[key])
    assert not torch.equal(diag, scoremerge.merge({key: base[key]}, one, "score")[key])


def test_weights_scale_task_vectors_and_lambda_the_update(family, tmp_path):
    folders, base, experts = family
    weights, lam = [0.5, 1.0, 2.0], 0.7
    got = mergekit_merge(config("score", folders, {"lambda": lam}, weights), tmp_path / "w")
    taus = scoremerge.task_vectors(base, experts)
    scaled = [{k: v if w == 1.0 else v * w for k, v in tau.items()}
              for tau, w in zip(taus, weights)]
    merged = scoremerge.merge_task_vectors(scaled, "score")
    assert_equal(got, {k: b + merged[k] * lam for k, b in base.items()})
    # and the same as scoremerge's own merge with these weights and alpha
    assert_equal(got, scoremerge.merge(base, experts, "score", weights=weights, alpha=lam))
    unweighted = scoremerge.merge(base, experts, "score", alpha=lam)
    key = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(got[key], unweighted[key])


def test_register_is_idempotent_and_adds_every_method(family):
    assert register() == METHODS == register()
    names = {m.spec.name for m in merge_methods.registered_methods()}
    assert set(METHODS) <= names
    spec = merge_methods.get("iso_cts").spec
    defaults = {p.name: p.default for p in spec.parameters}
    assert defaults == {"weight": 1.0, "lambda": 1.0,
                        **scoremerge.methods()["iso_cts"].defaults}
    assert spec.contract.base.value == "required"


def test_register_refuses_a_name_taken_by_another_method(monkeypatch):
    register()
    theirs = types.SimpleNamespace(spec=types.SimpleNamespace(name="tsv"))
    listed = [m for m in merge_methods.registered_methods() if m.spec.name != "tsv"] + [theirs]
    monkeypatch.setattr(merge_methods, "registered_methods", lambda: tuple(listed))
    with pytest.raises(ValueError, match="already has a merge method named 'tsv'"):
        register()


def test_run_mergekit_from_argv(family, tmp_path):
    folders, base, experts = family
    path = tmp_path / "tsv.yml"
    path.write_text(yaml.safe_dump(config("tsv", folders)))
    out = tmp_path / "out"
    assert run_mergekit([str(path), str(out), "--no-copy-tokenizer", "--quiet"]) == 0
    assert_equal(load_state_dict(out), scoremerge.merge(base, experts, "tsv"))
    assert run_mergekit([str(path)]) == 2                      # click's usage error


def test_bad_option_and_missing_base_are_refused(family):
    _, base, experts = family
    key = "model.layers.0.mlp.down_proj.weight"
    tensors = [base[key]] + [e[key] for e in experts]
    with pytest.raises(ValueError, match="'variant' of method 'score' must be one of"):
        merge_methods.merge_tensors(tensors, "score", base_index=0, parameters={"variant": "x"})
    with pytest.raises(ValueError, match="requires a base input"):
        merge_methods.merge_tensors(tensors, "score")


def test_missing_mergekit_names_the_install(monkeypatch):
    for name in ("mergekit", "mergekit.merge_methods", "mergekit.scripts.run_yaml"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install mergekit==0\.1\.5"):
        register()
    with pytest.raises(ModuleNotFoundError, match=r"pip install mergekit==0\.1\.5"):
        run_mergekit(["a.yml", "out"])


def test_importing_scoremerge_does_not_import_mergekit():
    code = ("import sys, scoremerge, scoremerge.integrations.mergekit; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'mergekit']")
    subprocess.run([sys.executable, "-c", code], check=True)
