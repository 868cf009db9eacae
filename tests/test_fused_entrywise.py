"""The compiled one-pass task arithmetic and linear (csrc/cpu/entrywise.cpp) against the torch
path they replace (methods.entrywise without `fused`): the same bits, on fresh odd-sized inputs
with signed zeros, cancelling tasks and magnitudes over many orders, split across threads at
odd offsets; the same errors for NaN, Inf and overflow; and the probe that guards the kernel
tells a different arithmetic apart."""
import importlib
import os

import pytest
import torch

from scoremerge import MergeInputError
from scoremerge.methods import get
from scoremerge.methods.entrywise import Fused, key_job, run_jobs

api = importlib.import_module("scoremerge.api")
cpu = importlib.import_module("scoremerge.backend.cpu")

needs_module = pytest.mark.skipif(cpu.extension()[0] is None and "CI" not in os.environ,
                                  reason="scoremerge._cpu was not built")


def inputs(T, n, seed):
    g = torch.Generator().manual_seed(seed)
    scale = 10 ** (12 * torch.rand(n, generator=g) - 6)
    base = torch.randn(n, generator=g) * scale
    base[:8] = torch.tensor([0.0, -0.0] * 4)
    experts = [base + torch.randn(n, generator=g) * scale * 10 ** (4 * torch.rand(n, generator=g) - 2)
               for _ in range(T)]
    experts[0][8:16] = base[8:16]
    if T > 1:
        experts[1][16:24] = -experts[0][16:24]
    return base, experts


def merged(method, opts, base, experts, weights, alpha, fused, allow_nonfinite=False):
    spec = get(method)
    out, job = key_job("k", base, experts, api._entrywise_fn("k", spec, opts, weights, False),
                       alpha=alpha, on_models=spec.on_models, compute_dtype=torch.float32,
                       device=torch.device("cpu"), names=["the base", "expert 0", "expert 1",
                                                          "expert 2", "expert 3"][:len(experts) + 1],
                       allow_nonfinite=allow_nonfinite, fused=fused)
    assert (job.fused is None) == (fused is None)
    run_jobs([job], torch.device("cpu"))
    return out


def test_the_module_is_built_under_ci():
    if "CI" in os.environ:
        assert cpu.extension()[0] is not None, cpu.extension()[1]


@needs_module
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_task_arithmetic_matches_the_torch_path_to_the_bit(T, weighted, alpha):
    seed = int(torch.randint(0, 2**31, (1,)))
    n = int(torch.randint(3 * 4099, 5 * 4099, (1,))) | 1
    base, experts = inputs(T, n, seed)
    weights = tuple(torch.randn(T).tolist()) if weighted else None
    plan = api._fused(get("task_arithmetic"), {}, weights, alpha, T)
    assert plan == Fused("task_arithmetic", weights)
    want = merged("task_arithmetic", {}, base, experts, weights, alpha, None)
    got = merged("task_arithmetic", {}, base, experts, weights, alpha, plan)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), seed


@needs_module
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_linear_matches_the_torch_path_to_the_bit(T, normalize, weighted):
    seed = int(torch.randint(0, 2**31, (1,)))
    base, experts = inputs(T, 3 * 4099 + 2 * T + 1, seed)
    weights = tuple(torch.rand(T).add(0.1).tolist()) if weighted else None
    plan = api._fused(get("linear"), {"normalize": normalize}, weights, 1.0, T)
    assert plan is not None and plan.kind == "linear"
    opts = {"normalize": normalize}
    want = merged("linear", opts, base, experts, weights, 1.0, None)
    got = merged("linear", opts, base, experts, weights, 1.0, plan)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), seed


def test_what_the_kernel_does_not_reproduce_keeps_the_torch_path():
    assert api._fused(get("task_arithmetic"), {}, None, 1.0, 5) is None    # torch's longer sum
    assert api._fused(get("mean"), {}, None, 1.0, 3) is None
    base, experts = inputs(3, 101, 0)
    plan = Fused("task_arithmetic")
    strided = torch.zeros(202)[::2]
    strided.copy_(experts[1])
    for b, es, fusable in ((base, experts, cpu.extension()[0] is not None),
                           (base.double(), [e.double() for e in experts], False),
                           (base, [experts[0], strided, experts[2]], False)):
        _, job = key_job("k", b, es, lambda x: x.sum(0), alpha=1.0, compute_dtype=b.dtype,
                         device=torch.device("cpu"), names=["b", "e", "e", "e"], fused=plan)
        assert (job.fused is not None) == fusable


@needs_module
def test_the_probe_tells_another_arithmetic_apart():
    """A kernel plan that computes something else (here, linear with the wrong divisor) fails
    the probe, so the guard can fail."""
    assert api._fused_agrees("linear", Fused("linear", (0.5, 0.25), 0.75), 1.0, 2, True)
    assert not api._fused_agrees("linear", Fused("linear", (0.5, 0.25), 0.7), 1.0, 2, True)


@needs_module
@pytest.mark.parametrize("where", [0, 1, 3])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_inputs_are_named_and_overflow_refused(where, bad):
    base, experts = inputs(3, 9001, 1)
    (base if where == 0 else experts[where - 1])[7777] = bad
    name = "the base" if where == 0 else f"expert {where - 1}"
    plan = api._fused(get("task_arithmetic"), {}, None, 1.0, 3)
    with pytest.raises(MergeInputError, match=rf"key 'k' of {name} contains "
                                              rf"{'NaN' if bad != bad else 'Inf'}"):
        merged("task_arithmetic", {}, base, experts, None, 1.0, plan)
    base, big = torch.full((9001,), 1e38), torch.full((9001,), 3e38)   # the sum overflows
    with pytest.raises(MergeInputError, match="key 'k' of the merged model holds Inf"):
        merged("task_arithmetic", {}, base, [big, big, big], None, 1.0, plan)
    out = merged("task_arithmetic", {}, base, [big, big, big], None, 1.0, plan,
                 allow_nonfinite=True)
    assert torch.isinf(out).all()
