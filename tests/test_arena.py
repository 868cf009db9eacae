"""The flat parameter arena: packing round-trips every parameter, groups are contiguous, a bound
model's parameters are views that ops.mix rewrites in place; bad input is named."""
import pytest
import torch
from torch import nn

from scoremerge import MergeInputError, ops
from scoremerge.online import ParameterArena


def small_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def head_of(key):
    return 1 if key.startswith("3.") else 0


def test_arena_round_trips_every_parameter_and_groups_are_contiguous():
    experts = [small_model(s).state_dict() for s in range(3)]
    arena = ParameterArena(experts, group_of=head_of, n_groups=2)
    floating = [k for k, v in experts[0].items() if v.is_floating_point()]
    assert set(arena.slots) == set(floating)              # num_batches_tracked is left out
    assert arena.buffer.shape == (3, arena.numel) and arena.bounds[-1] == arena.numel
    for k, expert in enumerate(experts):
        for key, view in arena.expert(k).items():
            assert torch.equal(view, expert[key])
    for key, slot in arena.slots.items():
        lo, hi = arena.bounds[slot.group], arena.bounds[slot.group + 1]
        assert lo <= slot.offset and slot.offset + slot.size <= hi, key


def test_bound_model_is_rewritten_in_place_by_mix():
    experts = [small_model(s).state_dict() for s in range(3)]
    arena = ParameterArena(experts, group_of=head_of, n_groups=2)
    model = small_model(99).eval()
    flat = arena.bind(model)
    x = torch.randn(4, 7)
    for k in range(3):
        onehot = torch.zeros(2, 3)
        onehot[:, k] = 1.0
        ops.mix(arena.buffer, onehot, arena.bounds, out=flat)
        reference = small_model(0).eval()
        reference.load_state_dict(experts[k])
        with torch.no_grad():
            assert torch.equal(model(x), reference(x)), k
    coeffs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]])
    ops.mix(arena.buffer, coeffs, arena.bounds, out=flat)
    w = model[3].weight.detach()
    want = 0.6 * experts[0]["3.weight"] + 0.4 * experts[1]["3.weight"]
    assert torch.allclose(w, want, atol=1e-6)
    storage = flat.untyped_storage().data_ptr()         # views into flat, not copies
    assert all(t.untyped_storage().data_ptr() == storage
               for t in (*model.parameters(), model[1].running_mean, model[1].running_var))


def test_bad_input_is_named_and_leaves_the_model_alone():
    good = small_model(0).state_dict()
    with pytest.raises(MergeInputError, match="at least one state dict"):
        ParameterArena([])
    bad_shape = dict(good) | {"0.weight": torch.zeros(5, 6)}
    with pytest.raises(MergeInputError, match="0.weight"):
        ParameterArena([good, bad_shape])
    with pytest.raises(MergeInputError, match="missing"):
        ParameterArena([good, {k: v for k, v in good.items() if k != "3.bias"}])
    with pytest.raises(MergeInputError, match="not a group"):
        ParameterArena([good], group_of=lambda k: 2, n_groups=2)
    arena = ParameterArena([good, small_model(1).state_dict()])
    other = nn.Sequential(nn.Linear(7, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 4))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(MergeInputError, match="3.weight"):
        arena.bind(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
