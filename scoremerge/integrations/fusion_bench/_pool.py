"""What every FusionBench algorithm class shares: models from the pool, task vectors, and the
merged task vector written back into the pretrained model."""
import copy
import re

import torch
from fusion_bench import BaseModelPool
from torch import nn

from ... import api
from ...errors import MergeInputError


def exact_names(keys):
    """FusionBench's exclude_keys / remove_keys are whole key names; scoremerge's exclude takes
    regular expressions searched anywhere, so each name becomes an anchored literal."""
    return [f"^{re.escape(str(k))}$" for k in (keys or ())]


def pretrained_and_task_vectors(modelpool):
    """(the pretrained module, [tau_t]: expert minus pretrained per floating-point key, in float32
    or wider) from a BaseModelPool or a dict of modules with a `_pretrained_` entry, as
    FusionBench's own classes accept. Experts are loaded one at a time, as FusionBench does."""
    if not isinstance(modelpool, BaseModelPool):
        modelpool = BaseModelPool(modelpool)
    pretrained = _module(modelpool.load_pretrained_model(), "_pretrained_")
    base = pretrained.state_dict()
    taus = []
    for name in modelpool.model_names:
        expert = _module(modelpool.load_model(name), name)
        try:
            taus.append(api.task_vectors(base, [expert.state_dict()])[0])
        except MergeInputError as e:        # its message calls every expert "expert 0"
            raise MergeInputError(f"model {name!r} of the pool: {e}") from None
        del expert
    return pretrained, taus


def pretrained_and_experts(modelpool):
    """(the pretrained module, its state dict, the experts' state dicts, their names for
    messages), for the entrywise methods' one pass over base and experts."""
    if not isinstance(modelpool, BaseModelPool):
        modelpool = BaseModelPool(modelpool)
    pretrained = _module(modelpool.load_pretrained_model(), "_pretrained_")
    experts = [_module(modelpool.load_model(name), name).state_dict()
               for name in modelpool.model_names]
    names = ["the pretrained model"] + [f"model {name!r} of the pool"
                                        for name in modelpool.model_names]
    return pretrained, pretrained.state_dict(), experts, names


def _module(model, name):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {name!r} of the pool is a {type(model).__name__}; scoremerge's "
                        "FusionBench algorithms merge pools of torch.nn.Module")
    return model


@torch.no_grad()
def load_state(pretrained, state, inplace=True):
    """The pretrained module (or a copy of it) holding `state`."""
    model = pretrained if inplace else copy.deepcopy(pretrained)
    model.load_state_dict(state)
    return model


@torch.no_grad()
def load_merged(pretrained, tau, scaling, inplace=True):
    """The pretrained module (or a copy of it) holding base + scaling * tau for every key of tau;
    other keys (integer buffers) keep their pretrained values.

    base + (scaling * tau) is FusionBench's order of operations: with float32 and float64
    models the final step rounds as FusionBench's does (torch.add's alpha can fuse the
    multiply-add and round once, which differs in the last bit)."""
    model = pretrained if inplace else copy.deepcopy(pretrained)
    state = model.state_dict()
    merged = {}
    for key, base in state.items():
        if key in tau:
            update = tau[key] if scaling is None else scaling * tau[key]
            merged[key] = (base.to(update.dtype) + update).to(base.dtype)
        else:
            merged[key] = base
    model.load_state_dict(merged)
    return model
