"""OnlineMerger's strategies: convex finite coefficients under each, calibration records and
their invariance to an expert's logit temperature, grouping (G = 1 bit for bit the batch
strategy), the running calibration, the search, bad input or options under each, and the
defaults against the tuning sweep's record."""
import math

import pytest
import torch
from torch.func import functional_call

from scoremerge import MergeInputError, OnlineMerger, ops, ref
from scoremerge.demo.model import TinyViT
from scoremerge.online import calibration_record, matched_temperature
from scoremerge.online.strategies import group_entropies, group_samples, search_candidates

from online_models import SMALL_VIT, assert_same_state, images, snapshot, vit_experts


# ---- strategies ----------------------------------------------------------------

def own_data_records(experts, reference=0.3):
    """Each expert's calibration record on its own stand-in source data."""
    return [calibration_record(TinyViT(SMALL_VIT), e, images(40, seed=50 + k) * (1 + k / 2),
                               reference_entropy=reference) for k, e in enumerate(experts)]


def two_domain_batch(n=12):
    """Half plain images, half brightened ones: a batch from two 'domains'."""
    return torch.cat([images(n // 2, seed=20), images(n - n // 2, seed=21) * 4])


STRATEGY_OPTIONS = {
    "paper": {"groups": 1},
    "defaults": {},
    "default with records": {"calibration": "records"},
    "records": {"calibration": "records"},
    "stream": {"calibration": "stream"},
    "stream, per-sample": {"calibration": "stream", "per_sample": True},
    "grouped": {"calibration": "records", "groups": 3},
    "grouped by coefficients": {"groups": 2, "group_by": "coefficients", "group_prior": 4},
    "grouped, coupled": {"groups": 2, "coupled": True},
    "per-sample models": {"groups": 64, "group_prior": 0, "temp_enc": 1.0},
    "search": {"strategy": "search", "calibration": "records"},
    "search, momentum": {"strategy": "search", "momentum": 0.5, "search_step": 0.5},
}


def make_merger(experts, options, model=None):
    options = dict(options)
    if options.get("calibration") == "records":
        options["calibration"] = own_data_records(experts)
    return OnlineMerger(model or TinyViT(SMALL_VIT), experts, **options)


@pytest.mark.parametrize("name", list(STRATEGY_OPTIONS))
def test_every_strategy_gives_convex_finite_coefficients(name):
    experts = vit_experts(4, sharpen=2)
    merger = make_merger(experts, STRATEGY_OPTIONS[name])
    for i, x in enumerate((two_domain_batch(12), images(7, seed=30) * 2, images(1, seed=31))):
        result = merger(x)
        assert result.logits.shape == (len(x), SMALL_VIT.classes)
        assert torch.isfinite(result.logits).all()
        vectors = [result.coefficients["encoder"], result.coefficients["head"]]
        if result.group_coefficients is not None:
            vectors += list(result.group_coefficients["encoder"])
            vectors += list(result.group_coefficients["head"])
            assert result.groups.shape == (len(x),)
            assert result.merged_forwards == len(result.group_coefficients["encoder"]) \
                == int(result.groups.max()) + 1
        for a in vectors:
            assert a.shape == (4,) and torch.isfinite(a).all() and (a >= 0).all(), (name, i)
            assert abs(a.sum().item() - 1) < 1e-5, (name, i)
        if STRATEGY_OPTIONS[name].get("strategy") == "search":
            assert result.merged_forwards == 4 + 2 and result.groups is None


def test_matched_temperature_reaches_the_reference_and_scales_with_the_logits():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 10, generator=g) * 3
    t = matched_temperature(z, 0.4)
    logp = torch.log_softmax(z.double() / t, dim=1)
    assert abs(-(logp.exp() * logp).sum(dim=1).mean().item() - 0.4) < 1e-9
    z64 = z.double()         # exact scaling: the bisection itself is good to float64 precision
    assert matched_temperature(z64 * 7.5, 0.4) == pytest.approx(7.5 * matched_temperature(z64, 0.4),
                                                                rel=1e-12)
    assert matched_temperature(z * 7.5, 0.4) == pytest.approx(7.5 * t, rel=1e-6)   # fp32 logits
    assert matched_temperature(z, 0.1) < t < matched_temperature(z, 1.0)
    for bad, reference in ((z, 0.0), (z, math.log(10)), (z[:, :1], 0.1)):
        with pytest.raises(MergeInputError, match="reference_entropy"):
            matched_temperature(bad, reference)
    tied = torch.zeros(4, 3)                     # uniform rows: ln 3 nats at every temperature
    with pytest.raises(MergeInputError, match="no temperature"):
        matched_temperature(tied, 0.5)
    z[3, 2] = float("nan")
    with pytest.raises(MergeInputError, match="NaN"):
        matched_temperature(z, 0.4)


@pytest.mark.parametrize("groups", [1, 3])
def test_records_make_coefficients_invariant_to_an_experts_logit_temperature(groups):
    """Scaling one expert's head by c scales its logits by c; its record scales by c too, and
    the calibrated coefficients stay as they were. Raw entropies move (the check can fail)."""
    experts = vit_experts(3)
    hot = [dict(e) for e in experts]
    hot[1] = {**experts[1], "head.weight": experts[1]["head.weight"] * 6,
              "head.bias": experts[1]["head.bias"] * 6}
    records, hot_records = own_data_records(experts), own_data_records(hot)
    assert hot_records[1] == pytest.approx(6 * records[1], rel=1e-5)
    x = two_domain_batch(16)
    results = [OnlineMerger(TinyViT(SMALL_VIT), e, calibration=r, groups=groups,
                            temp_enc=0.1, temp_head=0.1)(x)
               for e, r in ((experts, records), (hot, hot_records), (experts, None), (hot, None))]
    for group in ("encoder", "head"):
        torch.testing.assert_close(results[1].coefficients[group], results[0].coefficients[group],
                                   rtol=0, atol=1e-5)
        assert (results[3].coefficients[group] - results[2].coefficients[group]).abs().max() > 0.05
    if groups > 1:
        assert torch.equal(results[0].groups, results[1].groups)


@pytest.mark.parametrize("calibration", [None, "records"])
def test_groups_with_one_group_equal_the_batch_strategy_bit_for_bit(calibration):
    """G = 1, and G > 1 on a batch whose samples all look alike (one group forms): the same
    coefficients, parameters and logits to the last bit."""
    experts = vit_experts(3, sharpen=1)
    records = None if calibration is None else own_data_records(experts)
    x = images(1, seed=40).expand(9, -1, -1, -1).contiguous()
    models = [TinyViT(SMALL_VIT) for _ in range(3)]
    out = [OnlineMerger(m, experts, calibration=records, groups=G, temp_enc=0.2)(x)
           for m, G in zip(models, (1, 2, 9))]
    for result in out[1:]:
        assert result.groups is None and result.merged_forwards == 1
        assert torch.equal(result.logits, out[0].logits)
        for group in ("encoder", "head"):
            assert torch.equal(result.coefficients[group], out[0].coefficients[group])
    for model in models[1:]:
        assert_same_state(model, snapshot(models[0]))
    by_hand, _ = ops.entropy_weights(torch.stack([functional_call(TinyViT(SMALL_VIT).eval(), e,
                                                                  (x,)) for e in experts])
                                     / torch.tensor(records or [1.0] * 3).view(3, 1, 1), 0.2)
    torch.testing.assert_close(out[0].coefficients["encoder"], by_hand, rtol=0, atol=1e-6)


def test_each_group_is_predicted_by_its_own_merge():
    experts = vit_experts(3, sharpen=0)
    model = TinyViT(SMALL_VIT)
    merger = OnlineMerger(model, experts, calibration=own_data_records(experts), groups=2,
                          group_prior=2.0, temp_enc=0.1)
    x = two_domain_batch(14)
    result = merger(x)
    assert result.merged_forwards == 2 and set(result.groups.tolist()) == {0, 1}
    assert result.groups[0] == 0                         # numbered in order of first sample
    for g in range(2):
        a_enc, a_head = (result.group_coefficients[k][g] for k in ("encoder", "head"))
        mixed = {key: sum((a_head if key.startswith("head.") else a_enc)[k] * experts[k][key]
                          for k in range(3)) for key in experts[0]}
        members = result.groups == g
        with torch.no_grad():
            expected = functional_call(TinyViT(SMALL_VIT).eval(), mixed, (x[members],))
        torch.testing.assert_close(result.logits[members], expected, rtol=1e-5, atol=1e-5)
    last = {key: sum((result.group_coefficients["head" if key.startswith("head.") else "encoder"]
                      [1][k]) * experts[k][key] for k in range(3)) for key in experts[0]}
    for key, value in model.state_dict().items():          # the model holds the last group's
        torch.testing.assert_close(value, last[key], rtol=0, atol=1e-6)


def test_grouping_is_deterministic_and_separates_clear_groups():
    H = torch.tensor([[0.1, 2.0]] * 5 + [[2.0, 0.1]] * 4 + [[0.12, 1.9]]).T    # [K=2, B=10]
    labels = group_samples(H, 2)
    assert labels.tolist() == [0] * 5 + [1] * 4 + [0]
    assert torch.equal(group_samples(H, 2), labels)
    assert group_samples(H, 2, by="coefficients", temperature=0.5).tolist() == labels.tolist()
    assert group_samples(H[:, :4], 3).tolist() == [0, 0, 0, 0]       # one distinct profile
    assert group_samples(H[:, 4:7], 3).tolist() == [0, 1, 1]          # two: 5 and 6 are alike
    distinct = H + torch.arange(10.0) * 1e-3
    assert group_samples(distinct, 10).tolist() == list(range(10))     # G >= B: every sample
    lone = torch.tensor([[0.1, 2.0]] * 5 + [[2.0, 0.1]]).T             # one sample unlike the rest
    assert group_samples(lone, 2).tolist() == [0] * 5 + [1]
    assert group_samples(lone, 2, min_size=2).tolist() == [0] * 6
    pairs = group_samples(distinct, 10, min_size=2)
    assert torch.bincount(pairs).min() >= 2 and int(pairs.max()) >= 1
    alone = group_entropies(H, labels, prior=0.0)                     # [n = 2, K = 2]
    torch.testing.assert_close(alone, torch.stack([H[:, labels == g].mean(dim=1)
                                                   for g in range(2)]))
    shrunk = group_entropies(H, labels, prior=1e9)
    torch.testing.assert_close(shrunk, H.mean(dim=1).expand(2, 2), rtol=1e-6, atol=1e-6)
    some = group_entropies(H, labels, prior=5.0)[1]                   # 4 members + 5 of the mean
    torch.testing.assert_close(some, (4 * H[:, 5:9].mean(dim=1) + 5 * H.mean(dim=1)) / 9)


def test_stream_calibration_weighs_each_expert_against_its_own_running_mean():
    experts = vit_experts(3, sharpen=0)
    merger = OnlineMerger(TinyViT(SMALL_VIT), experts, calibration="stream", temp_enc=0.05,
                          groups=1)
    raw = OnlineMerger(TinyViT(SMALL_VIT), experts, temp_enc=0.05, groups=1)
    x1, x2 = images(10, seed=3), images(10, seed=4) * 3
    first = merger(x1)
    # Every expert's entropy equals its running mean on the first batch: the uniform mean.
    torch.testing.assert_close(first.coefficients["encoder"], torch.full((3,), 1 / 3),
                               rtol=0, atol=1e-5)
    assert raw(x1).coefficients["encoder"].max() > 0.9        # raw entropies favour expert 0
    h1 = raw(x1).entropies
    second = merger(x2)
    with torch.no_grad():
        z = torch.stack([functional_call(TinyViT(SMALL_VIT).eval(), e, (x2,)) for e in experts])
    per_sample = torch.stack([torch.tensor([ref.entropy.prediction_entropy(z[k, b])
                                            for b in range(10)]) for k in range(3)]).float()
    running = (h1 + per_sample.mean(dim=1)) / 2
    expected = torch.softmax(-(per_sample / running[:, None]).mean(dim=1) / 0.05, dim=0)
    torch.testing.assert_close(second.coefficients["encoder"], expected, rtol=0, atol=1e-4)
    merger.reset()
    torch.testing.assert_close(merger(x2).coefficients["encoder"], torch.full((3,), 1 / 3),
                               rtol=0, atol=1e-5)


def test_search_keeps_the_candidate_with_the_lowest_merged_entropy():
    experts = vit_experts(3)
    records = own_data_records(experts)
    model = TinyViT(SMALL_VIT)
    merger = OnlineMerger(model, experts, strategy="search", calibration=records,
                          search_step=0.5, temp_enc=0.3, momentum=0.5)
    x = images(12, seed=8)
    first = merger(x)
    assert first.merged_forwards == 5 and first.head_entropies is None
    centre, _ = ops.entropy_weights(torch.stack([functional_call(TinyViT(SMALL_VIT).eval(), e,
                                                                 (x,)) for e in experts])
                                    / torch.tensor(records).view(3, 1, 1), 0.3)
    scores = []
    for c in search_candidates(centre, 0.5):
        mixed = {key: sum(c[k] * experts[k][key] for k in range(3)) for key in experts[0]}
        with torch.no_grad():
            z = functional_call(TinyViT(SMALL_VIT).eval(), mixed, (x,))
        z = z / (c @ torch.tensor(records))
        scores.append(ref.entropy.entropy_weights(z.unsqueeze(0), 1.0)[1].item())
    best = min(range(len(scores)), key=scores.__getitem__)
    assert sorted(scores)[1] - scores[best] > 1e-4          # no near-tie in this setting
    chosen = search_candidates(centre, 0.5)[best]
    torch.testing.assert_close(first.coefficients["encoder"], chosen, rtol=0, atol=1e-5)
    for key, value in model.state_dict().items():          # the model holds the chosen merge
        expected = sum(chosen[k] * experts[k][key] for k in range(3))
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    second = merger(images(12, seed=9) * 2)                # momentum: the centre moves halfway
    assert any(torch.allclose(second.coefficients["encoder"], c, atol=1e-5)
               for c in search_candidates(0.5 * first.coefficients["encoder"]
                                          + 0.5 * second_centre(experts, records), 0.5))


def second_centre(experts, records):
    x = images(12, seed=9) * 2
    with torch.no_grad():
        z = torch.stack([functional_call(TinyViT(SMALL_VIT).eval(), e, (x,)) for e in experts])
    return ops.entropy_weights(z / torch.tensor(records).view(3, 1, 1), 0.3)[0]


@pytest.mark.parametrize("name", list(STRATEGY_OPTIONS))
def test_bad_batches_leave_the_parameters_unchanged_under_every_strategy(name):
    """Refused batches change neither the parameters nor the merger's state across batches
    (momentum, running entropies): afterwards it goes on exactly as a twin never shown them."""
    experts = vit_experts(3, sharpen=0)
    model = TinyViT(SMALL_VIT)
    merger = make_merger(experts, STRATEGY_OPTIONS[name], model)
    twin = make_merger(experts, STRATEGY_OPTIONS[name])
    poisoned = images(5)
    poisoned[3, 0, 2, 2] = float("nan")
    for batches_before in (0, 1):
        if batches_before:
            merger(two_domain_batch(10))
            twin(two_domain_batch(10))
        before = snapshot(model)
        for bad, error in ((images(0), MergeInputError), (poisoned, MergeInputError),
                           ([[0.0]], TypeError)):
            with pytest.raises(error):
                merger(bad)
            assert_same_state(model, before)
    x = images(9, seed=33) * 2
    result, expected = merger(x), twin(x)
    assert torch.equal(result.logits, expected.logits)
    for group in ("encoder", "head"):
        assert torch.equal(result.coefficients[group], expected.coefficients[group])


@pytest.mark.parametrize("name", ["grouped", "search", "per-sample models"])
def test_a_failure_mid_batch_restores_the_parameters(monkeypatch, name):
    """A forward that fails after some groups or candidates were mixed (the K expert passes,
    then the first merged forward, went through) puts the parameters back."""
    experts = vit_experts(3, sharpen=1)
    model = TinyViT(SMALL_VIT)
    merger = make_merger(experts, STRATEGY_OPTIONS[name], model)
    merger(two_domain_batch(10))
    before = snapshot(model)
    calls = []
    real = model.forward

    def failing_later(*args, **kw):
        calls.append(1)
        if len(calls) == 3 + 2:
            raise RuntimeError("injected")
        return real(*args, **kw)

    monkeypatch.setattr(model, "forward", failing_later)
    with pytest.raises(RuntimeError, match="injected"):
        merger(two_domain_batch(10) * 2)
    assert len(calls) == 5
    assert_same_state(model, before)


@pytest.mark.parametrize("option, message", [
    ({"strategy": "greedy"}, "strategy"), ({"groups": 0}, "groups"), ({"groups": 1.5}, "groups"),
    ({"groups": True}, "groups"), ({"group_by": "pixels"}, "group_by"),
    ({"group_prior": -1.0}, "group_prior"), ({"group_prior": float("nan")}, "group_prior"),
    ({"search_step": 0.0}, "search_step"), ({"search_step": 1.5}, "search_step"),
    ({"groups": 2, "momentum": 0.5}, "momentum=0"), ({"groups": 2, "per_sample": True}, "groups"),
    ({"groups": 2, "strategy": "search"}, "search"),
    ({"calibration": [1.0, 2.0]}, "one record per expert"),
    ({"calibration": [1.0, -2.0, 1.0]}, "record 1"),
    ({"calibration": [1.0, float("inf"), 1.0]}, "record 1"),
    ({"calibration": "running"}, "one record per expert"),
    ({"calibration": 2.0}, "one record per expert")])
def test_bad_strategy_options_are_refused_before_the_model_is_touched(option, message):
    model = TinyViT(SMALL_VIT)
    before = snapshot(model)
    with pytest.raises(MergeInputError, match=message):
        OnlineMerger(model, vit_experts(3), **option)
    assert_same_state(model, before)
    assert all(p._base is None for p in model.parameters())


def test_records_may_be_a_tensor():
    experts = vit_experts(3)
    records = own_data_records(experts)
    x = two_domain_batch(8)
    a = OnlineMerger(TinyViT(SMALL_VIT), experts, calibration=records)(x)
    b = OnlineMerger(TinyViT(SMALL_VIT), experts, calibration=torch.tensor(records,
                                                                         dtype=torch.float64))(x)
    assert torch.equal(a.logits, b.logits)


def test_the_defaults_are_the_tuning_sweeps_choice():
    """OnlineMerger's defaults, the records' reference entropy and the demo's rows are what
    bench/online_strategy_sweep.py chose on the tuning seeds (bench/results/)."""
    import inspect
    import json
    from pathlib import Path

    from scoremerge.demo.online import DEFAULT, ONLINE_VARIANTS, RECORDS
    from scoremerge.online.calibration import REFERENCE_ENTROPY
    path = Path(__file__).parents[1] / "bench" / "results" / "online_strategy_sweep.json"
    if not path.exists():
        pytest.skip("the sweep's results are not in this checkout")
    sweep = json.loads(path.read_text())
    assert not set(sweep["seeds"]) & set(range(5))       # never the reported seeds
    chosen = sweep["chosen"]["default"]
    assert chosen["reference_entropy"] == REFERENCE_ENTROPY
    options = dict(chosen["options"])
    assert options.pop("calibration") == RECORDS and ONLINE_VARIANTS[DEFAULT] == {
        "calibration": RECORDS}
    defaults = {name: p.default for name, p in inspect.signature(OnlineMerger).parameters.items()}
    merger = OnlineMerger(TinyViT(SMALL_VIT), vit_experts(2))
    for name, value in options.items():
        assert getattr(merger, name) == value == (defaults[name] if defaults[name] is not None
                                                  else value), name
    search = sweep["chosen"]["search"]["options"]
    built = OnlineMerger(TinyViT(SMALL_VIT), vit_experts(2), strategy="search")
    assert (built.search_step, built.momentum) == (search["search_step"], search["momentum"])
    assert ONLINE_VARIANTS["calibrated, search"] == {
        "strategy": "search", "calibration": RECORDS, "groups": 1}
    assert ONLINE_VARIANTS["DaWin per-sample"] == sweep["chosen"]["dawin"]["options"]
