"""merge, task_vectors, methods, and every bad input the API must reject by name."""
import dataclasses

import pytest
import torch

import scoremerge
from scoremerge import BackendUnavailableError, MergeInputError
from scoremerge.methods import get

from conftest import random_task_vectors, rel_err

SHAPES = {"w": (12, 8), "b": (12,), "v": (8, 12)}


def models(T=3, dtype=torch.float32):
    base = {k: v.to(dtype) for k, v in random_task_vectors(SHAPES, 1, seed=0)[0].items()}
    base["position_ids"] = torch.arange(5)
    experts = []
    for t, tau in enumerate(random_task_vectors(SHAPES, T, seed=1, scale=0.1)):
        e = {k: (base[k].double() + tau[k]).to(dtype) for k in SHAPES}
        e["position_ids"] = torch.arange(5)
        experts.append(e)
    return base, experts


def test_merge_is_base_plus_alpha_tau_and_keeps_dtypes():
    base, experts = models(dtype=torch.bfloat16)
    merged = scoremerge.merge(base, experts, "score", alpha=0.7)
    taus = scoremerge.merge_task_vectors(scoremerge.task_vectors(base, experts), "score")
    for k in SHAPES:
        assert merged[k].dtype == torch.bfloat16
        want = (base[k].float() + 0.7 * taus[k]).to(torch.bfloat16)
        assert torch.equal(merged[k], want)
    assert torch.equal(merged["position_ids"], base["position_ids"])


@pytest.mark.parametrize("method", ["score", "ties", "iso_c", "mean"])
def test_the_callers_task_vectors_are_left_as_they_were(method):
    """A merge drops the task vectors it made itself once they are stacked; the caller's stay."""
    tvs = random_task_vectors(SHAPES, 3, seed=2, dtype=torch.float32)
    kept = [dict(tv) for tv in tvs]
    scoremerge.merge_task_vectors(tvs, method)
    assert all(tv.keys() == k.keys() and all(tv[key] is k[key] for key in tv)
               for tv, k in zip(tvs, kept))
    base, experts = models()
    before = [dict(e) for e in experts]
    scoremerge.merge(base, experts, method)
    assert all(e.keys() == b.keys() for e, b in zip(experts, before))


def test_task_vectors_are_at_least_float32():
    base, experts = models(dtype=torch.bfloat16)
    tvs = scoremerge.task_vectors(base, experts)
    assert set(tvs[0]) == set(SHAPES) and tvs[0]["w"].dtype == torch.float32


@pytest.mark.parametrize("method", ["mean", "task_arithmetic", "ties", "magmax", "tsv", "iso_c",
                                    "iso_cts", "score"])
def test_experts_of_different_dtypes_merge_as_the_reference_does(method):
    """A bfloat16 base with bfloat16, float64 and float32 experts: each task vector promotes on
    its own, and the merge keeps the base's dtype; the result is the per-key reference's (entry-wise methods to the bit, the SVD methods within
    one bfloat16 rounding of it)."""
    base, experts = models(dtype=torch.bfloat16)
    experts = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in e.items()}
               for e, dtype in zip(experts, (torch.bfloat16, torch.float64, torch.float32))]
    got = scoremerge.merge(base, experts, method)
    want = scoremerge.merge(base, experts, method, backend="reference")
    for k in SHAPES:
        assert got[k].dtype == torch.bfloat16
        if get(method).kind == "matrix":
            ulp = 2.0 ** -7 * want[k].float().abs()
            assert ((got[k].float() - want[k].float()).abs() <= ulp).all(), k
        else:
            assert torch.equal(got[k], want[k]), k


def test_compute_dtype_option():
    tvs = [{k: v.float() for k, v in tv.items()} for tv in random_task_vectors(SHAPES, 3, seed=2)]
    out32 = scoremerge.merge_task_vectors(tvs, "tsv")
    out64 = scoremerge.merge_task_vectors(tvs, "tsv", dtype="float64")
    assert out64["w"].dtype == torch.float32          # outputs keep the input dtype
    answer = scoremerge.ref.merge_task_vectors([{k: v.double() for k, v in tv.items()}
                                                for tv in tvs], "tsv")["w"]
    assert rel_err(out64["w"], answer) <= rel_err(out32["w"], answer) + 1e-7


def test_progress_bar_counts_keys(capsys):
    scoremerge.merge_task_vectors(random_task_vectors(SHAPES, 2, seed=3), "score", progress=True)
    assert "3/3" in capsys.readouterr().err


def test_methods_lists_every_method_with_defaults():
    ms = scoremerge.methods()
    assert list(ms) == ["mean", "linear", "task_arithmetic", "magmax", "ties", "score", "tsv",
                        "iso_c", "iso_cts"]
    assert ms["score"].defaults == {"variant": "full", "trim_multiplier": 1.96, "trim_per_task": True}
    assert ms["ties"].defaults == {"density": 0.2, "scope": "global", "disjoint": "mean",
                                   "zero_sign": "zero", "trim": "threshold"}
    assert ms["linear"].defaults == {"normalize": True} and ms["linear"].on_models
    assert ms["iso_cts"].defaults == {"common_space_fraction": 0.8}


def test_registry_rejects_duplicates_and_undeclared_options():
    from scoremerge.methods.registry import merge_method
    with pytest.raises(ValueError, match="registered twice"):
        merge_method("mean", kind="elementwise", summary="", paper="", reference=lambda t: t)(
            lambda t: t)

    def bad(tau, *, gamma=1.0):
        return tau
    with pytest.raises(TypeError, match="gamma"):
        merge_method("new", kind="matrix", summary="", paper="", reference=lambda t: t)(bad)
    with pytest.raises(ValueError, match="only a matrix method reads the task sum"):
        merge_method("new", kind="elementwise", summary="", paper="", reference=lambda t: t,
                     on_task_sum=True)(lambda t: t)


def test_a_method_on_the_task_sum_is_given_the_weighted_sum_only(monkeypatch):
    """Iso-C reads the task matrices only through their sum: the API hands it [B, 1, m, n],
    each key's weighted sum in the compute dtype, and the merge equals the reference's."""
    from scoremerge.methods import registry
    spec = registry.get("iso_c")
    seen = []

    def recording(tau, **kw):
        seen.append((tuple(tau.shape), tau.dtype))
        return spec.fn(tau, **kw)
    monkeypatch.setitem(registry._REGISTRY, "iso_c", dataclasses.replace(spec, fn=recording))
    tvs = [{k: v.float() for k, v in tv.items()} for tv in random_task_vectors(SHAPES, 3, seed=8)]
    weights = (0.5, -1.25, 2.0)
    got = scoremerge.merge_task_vectors(tvs, "iso_c", weights=weights, dtype="float64")
    assert sorted(seen) == [((1, 1, 8, 12), torch.float64), ((1, 1, 12, 8), torch.float64)]
    want = scoremerge.ref.merge_task_vectors(
        [{k: v.double() for k, v in tv.items()} for tv in tvs], "iso_c", weights=weights)
    for key in ("w", "v"):
        assert rel_err(got[key].double(), want[key]) < 1e-6, key


@pytest.mark.parametrize("mutate,message", [
    (lambda b, e: e[1].pop("w"), r"expert 1 does not have the keys of the base: missing 1 key\(s\) of the base: 'w'"),
    (lambda b, e: e[0].update(extra=torch.ones(2)), r"expert 0 .* has 1 key\(s\) the base lacks: 'extra'"),
    (lambda b, e: e[2].update(w=torch.ones(8, 12)), r"shape mismatch at key 'w': the base has \(12, 8\), expert 2 has \(8, 12\)"),
    (lambda b, e: e[1]["v"].__setitem__((0, 0), float("nan")), r"key 'v' of expert 1 contains NaN"),
    (lambda b, e: b["b"].__setitem__(3, float("inf")), r"key 'b' of the base contains Inf"),
    (lambda b, e: e[0].update(position_ids=torch.arange(1, 6)), r"non-float key 'position_ids' differs"),
])
def test_bad_models_are_named(mutate, message):
    base, experts = models()
    mutate(base, experts)
    with pytest.raises(MergeInputError, match=message):
        scoremerge.merge(base, experts, "score")


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "scroe"}, r"unknown method 'scroe' .*did you mean 'score'\?"),
    ({"variant": "diagonal"}, r"'variant' of method 'score' must be one of 'full', 'diag'"),
    ({"trim_multiplyer": 2.0}, r"unknown option 'trim_multiplyer' .*did you mean 'trim_multiplier'\?"),
    ({"method": "ties", "density": 0.0}, r"'density' of method 'ties' must be in \(0.0, 1.0\]"),
    ({"method": "ties", "density": "lots"}, r"'density' of method 'ties' takes a float"),
    ({"trim_per_task": "maybe"}, r"'trim_per_task' .* takes a bool"),
    ({"exclude": ["("]}, r"exclude pattern '\(' is not a regular expression"),
    ({"backend": "fast"}, r"unknown backend 'fast'"),
    ({"dtype": "float16"}, r"compute dtype must be float32 or float64"),
    ({"alpha": "big"}, r"alpha must be a number"),
])
def test_bad_arguments_are_named(kwargs, message):
    base, experts = models()
    kwargs = {"method": "score", **kwargs}
    with pytest.raises(MergeInputError, match=message):
        scoremerge.merge(base, experts, **kwargs)


def test_no_experts_and_integer_task_vectors():
    base, _ = models()
    with pytest.raises(MergeInputError, match="no experts given"):
        scoremerge.merge(base, [], "mean")
    with pytest.raises(MergeInputError, match=r"needs at least 1 expert\(s\) / task vector\(s\), got 0"):
        scoremerge.merge_task_vectors([], "mean")
    with pytest.raises(MergeInputError, match="task vectors hold floating-point keys only"):
        scoremerge.merge_task_vectors([{"ids": torch.arange(3)}], "mean")


def test_a_named_backend_that_cannot_run_says_why():
    tvs = random_task_vectors(SHAPES, 2, seed=4)
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run truncated_svd"):
        scoremerge.merge_task_vectors(tvs, "score", backend="cuda")
    assert scoremerge.merge_task_vectors(tvs, "mean", backend="torch")["w"].shape == (12, 8)


def test_environment_variable_chooses_the_backend(monkeypatch):
    monkeypatch.setenv("SCOREMERGE_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot run"):
            scoremerge.merge_task_vectors(random_task_vectors(SHAPES, 2, seed=4), "tsv")
