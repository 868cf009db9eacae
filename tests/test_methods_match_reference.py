"""The batched torch backend against scoremerge.ref, in float64 and in float32 against the
float64 answer; SCORE's invariances."""
import pytest
import torch

import scoremerge
from scoremerge import ref
from scoremerge.methods.routing import routes_to_matrix

from conftest import MIXED_SHAPES, random_task_vectors, rel_err

METHODS = [name for name, spec in scoremerge.methods().items() if not spec.on_models]
OPTIONS = {"score": [{}, {"variant": "diag"}, {"variant": "offdiag"}, {"variant": "untrimmed"},
                     {"trim_per_task": False, "trim_multiplier": 1.0}],
           "ties": [{}, {"scope": "tensor", "density": 0.5}, {"disjoint": "sum"},
                    {"disjoint": "max", "scope": "tensor", "density": 0.5},
                    {"zero_sign": "majority"}],
           "iso_cts": [{}, {"common_space_fraction": 0.5}]}
CASES = [(m, o) for m in METHODS for o in OPTIONS.get(m, [{}])]


@pytest.mark.parametrize("method,options", CASES)
def test_float64_equals_reference(method, options, mixed_task_vectors):
    fast = scoremerge.merge_task_vectors(mixed_task_vectors, method, **options)
    want = ref.merge_task_vectors(mixed_task_vectors, method, **options)
    assert list(fast) == list(want)
    for key in want:
        assert fast[key].dtype == torch.float64
        assert rel_err(fast[key], want[key]) < 1e-9, key


@pytest.mark.parametrize("method,options", CASES)
def test_float32_error_is_earned_from_the_reference(method, options):
    """Error against the float64 answer at most 2x the float32 reference's own (+ 1e-6 for
    results so exact that rounding the output dominates)."""
    tv64 = random_task_vectors(MIXED_SHAPES, T=3, seed=7)
    tv32 = [{k: v.float() for k, v in tv.items()} for tv in tv64]
    answer = ref.merge_task_vectors(tv64, method, **options)
    ref32 = ref.merge_task_vectors(tv32, method, **options)
    fast = scoremerge.merge_task_vectors(tv32, method, **options)
    for key in answer:
        assert fast[key].dtype == torch.float32
        assert rel_err(fast[key], answer[key]) <= 2 * rel_err(ref32[key], answer[key]) + 1e-6, key


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("method", ["score", "tsv", "iso_c", "iso_cts"])
def test_random_shapes(method, seed):
    g = torch.Generator().manual_seed(100 + seed)
    T = int(torch.randint(1, 5, (1,), generator=g))
    shapes = {f"k{i}": tuple(int(x) for x in torch.randint(1, 40, (2,), generator=g))
              for i in range(5)}
    tvs = random_task_vectors(shapes, T, seed)
    fast, want = scoremerge.merge_task_vectors(tvs, method), ref.merge_task_vectors(tvs, method)
    for key in want:
        assert rel_err(fast[key], want[key]) < 1e-9, (key, shapes[key], T)


@pytest.mark.parametrize("method", METHODS)
def test_task_order_does_not_matter(method, mixed_task_vectors):
    a = scoremerge.merge_task_vectors(mixed_task_vectors, method)
    b = scoremerge.merge_task_vectors(mixed_task_vectors[::-1], method)
    for key in a:
        assert rel_err(a[key], b[key]) < 1e-9, key


def _random_flips(seed):
    g = torch.Generator().manual_seed(seed)

    def flip(U, Vh):
        s = torch.where(torch.rand(U.shape[-1], generator=g) < 0.5, -1.0, 1.0).to(U.dtype)
        return U * s, Vh * s[:, None]
    return flip


@pytest.mark.parametrize("method,options,invariant", [
    ("tsv", {}, True), ("iso_c", {}, True), ("iso_cts", {}, True),
    ("score", {"variant": "diag"}, True), ("score", {}, False)])
def test_sign_invariance(method, options, invariant, monkeypatch):
    """Random singular-vector signs change nothing for the sign-invariant methods, and do
    change SCORE full (which is why the sign convention exists)."""
    taus = [torch.randn(12, 9, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
            for t in range(3)]
    canonical = getattr(ref.methods, method)(taus, **options)
    monkeypatch.setattr(ref.linalg, "canonical_signs", _random_flips(0))
    flipped = getattr(ref.methods, method)(taus, **options)
    assert (rel_err(flipped, canonical) < 1e-10) == invariant


def test_one_task_returns_the_task_vector():
    tv = random_task_vectors(MIXED_SHAPES, T=1, seed=5)
    for method in ("score", "tsv", "mean", "task_arithmetic", "magmax"):
        out = scoremerge.merge_task_vectors(tv, method)
        for key in tv[0]:
            assert rel_err(out[key], tv[0][key]) < 1e-9, (method, key)


def test_routing_keeps_thin_and_excluded_keys_on_the_mean_path(mixed_task_vectors):
    out = scoremerge.merge_task_vectors(mixed_task_vectors, "score", exclude=["head"])
    mean = {k: sum(tv[k] for tv in mixed_task_vectors) / 3 for k in MIXED_SHAPES}
    for key in ("pos_embed", "head", "blocks.0.norm"):
        assert not routes_to_matrix(MIXED_SHAPES[key], key, 3, ["head"])
        assert torch.allclose(out[key], mean[key])
    assert rel_err(out["blocks.0.qkv"], mean["blocks.0.qkv"]) > 0.1


def test_all_zero_layer_gives_finite_output():
    tvs = random_task_vectors({"w": (20, 12), "z": (20, 12)}, T=3, seed=2)
    for tv in tvs:
        tv["z"].zero_()
    tvs[0]["w"].zero_()                                   # one task with nothing in this layer
    for method in ("score", "tsv", "iso_c", "iso_cts"):
        out = scoremerge.merge_task_vectors(tvs, method)
        assert torch.isfinite(out["w"]).all() and torch.equal(out["z"], torch.zeros(20, 12,
                                                                                      dtype=torch.float64))


def test_backend_reference_runs_the_per_key_loops(mixed_task_vectors):
    a = scoremerge.merge_task_vectors(mixed_task_vectors, "score", backend="reference")
    b = ref.merge_task_vectors(mixed_task_vectors, "score")
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_methods_merge_keys_thinner_than_the_task_count(method):
    """Iso-C and Iso-CTS decompose the summed matrix, so a 2-D key with fewer rows than tasks
    still has a basis: both paths merge it isotropically (a single row comes back as the sum)."""
    shapes = {"head": (2, 15), "row": (1, 9), "narrow": (3, 40)}
    tvs = random_task_vectors(shapes, T=4, seed=3)
    fast, want = scoremerge.merge_task_vectors(tvs, method), ref.merge_task_vectors(tvs, method)
    for key, shape in shapes.items():
        assert routes_to_matrix(shape, key, 4, [], method)
        assert not routes_to_matrix(shape, key, 4, [], "tsv")
        assert rel_err(fast[key], want[key]) < 1e-9, key
        assert rel_err(fast[key], sum(tv[key] for tv in tvs) / 4) > 0.1, key
    assert rel_err(fast["row"], sum(tv["row"] for tv in tvs)) < 1e-12


def test_magmax_ties_take_the_later_task_in_both_paths():
    g = torch.Generator().manual_seed(4)
    tvs = [{"w": torch.randint(-2, 3, (40, 30), generator=g).double()} for _ in range(4)]
    stacked = torch.stack([tv["w"] for tv in tvs]).abs()
    top2 = stacked.topk(2, dim=0).values
    assert (top2[0] == top2[1]).sum() > 100                   # ties, of either sign, abound
    fast, want = scoremerge.merge_task_vectors(tvs, "magmax"), ref.merge_task_vectors(tvs, "magmax")
    assert torch.equal(fast["w"], want["w"])
    last = 3 - stacked.flip(0).argmax(dim=0)
    assert torch.equal(want["w"], torch.stack([tv["w"] for tv in tvs]).gather(0, last[None])[0])


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ties_zero_sign_majority_in_both_paths(scope):
    """Values of -2..2 cancel exactly in many entries: with zero_sign="majority" those entries
    take the sign most entries of the scope elect, identically in both paths."""
    g = torch.Generator().manual_seed(6)
    shapes = {"a": (30, 20), "b": (50,)}
    tvs = [{k: torch.randint(-2, 3, s, generator=g).double() for k, s in shapes.items()}
           for _ in range(4)]
    opts = {"density": 0.9, "scope": scope, "zero_sign": "majority"}
    fast = scoremerge.merge_task_vectors(tvs, "ties", **opts)
    want = ref.merge_task_vectors(tvs, "ties", **opts)
    zero = scoremerge.merge_task_vectors(tvs, "ties", density=0.9, scope=scope)
    for key in shapes:
        assert torch.equal(fast[key], want[key]), key
    assert sum(int((fast[k] != zero[k]).sum()) for k in shapes) > 10
