"""scoremerge's methods as mergekit 0.1.5 merge methods (its class API: a GroupMergeMethod with a
MergeMethodSpec, as mergekit's own generalized task arithmetic is built). Imports mergekit.

One call per output tensor: the group's base and expert tensors give the task vectors
tau_t = weight_t * (expert_t - base), in float32 or wider; scoremerge.merge_task_vectors merges
them for that one key (1-D and thin keys take the mean path, as in scoremerge.merge); the result
is base + lambda * merged, in the base's dtype (mergekit's `dtype` decides that dtype).
"""
import math
from functools import partial
from typing import Any

import torch
from mergekit.merge_methods.base import (BasePolicy, GroupMergeMethod, InputContract,
                                         MergeMethodSpec, ParameterScope, ParameterSpec,
                                         TensorGroup)
from pydantic import BeforeValidator
from typing_extensions import Annotated

from scoremerge import api
from scoremerge.errors import MergeInputError, shown
from scoremerge.methods.entrywise import plus


def _finite(value, name):
    if isinstance(value, bool):
        raise ValueError(f"parameter {name!r} takes a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"parameter {name!r} must be finite, got {value}")
    return value


def _option_spec(option, method):
    """A scoremerge option as a shared mergekit parameter, parsed by scoremerge's own rules
    (its choices and ranges; its message in mergekit's validation error)."""
    parse = BeforeValidator(partial(option.parse, method=method))
    return ParameterSpec(option.name, Annotated[type(option.default), parse],
                         ParameterScope.SHARED, default=option.default, description=option.help)


def _number(name, scope, description):
    return ParameterSpec(name, Annotated[float, BeforeValidator(partial(_finite, name=name))],
                         scope, default=1.0, description=description)


class ScoremergeMethod(GroupMergeMethod):
    """scoremerge method `name` in mergekit. Parameters: `weight` per model (default 1.0): the
    weights scale the task vectors before the decomposition (tau_t -> weight_t * tau_t), not the
    merged result; `lambda` (default 1.0): the merged update's scale (scoremerge's alpha); and
    the method's own options with scoremerge's defaults (scoremerge.methods()[name].defaults),
    e.g. SCORE's `variant`. A base model is required."""

    def __init__(self, name):
        method = api.methods()[name]
        self.scoremerge_name = name
        self.option_names = tuple(o.name for o in method.options)
        self.spec = MergeMethodSpec(
            name=name,
            pretty_name=f"{name} (scoremerge: {method.paper})",
            parameters=(
                _number("weight", ParameterScope.NON_BASE,
                        "scales this model's task vector before the decomposition"),
                _number("lambda", ParameterScope.SHARED,
                        "scales the merged task vector: base + lambda * merged"),
                *(_option_spec(o, name) for o in method.options)),
            contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=method.min_tasks))

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        key = group.metadata.name or "tensor"
        base = group.base.tensor
        if not base.is_floating_point():
            raise MergeInputError(f"{key}: scoremerge merges floating-point tensors, got "
                                  f"{base.dtype}")
        cdtype = torch.promote_types(base.dtype, torch.float32)
        b = base.to(cdtype)
        taus = []
        for entry in group.non_base:
            tau = entry.tensor.to(cdtype) - b
            weight = parameters["weight"][entry.id]
            taus.append({key: tau if weight == 1.0 else tau * weight})
        options = {n: parameters[n] for n in self.option_names}
        merged = api.merge_task_vectors(taus, self.scoremerge_name, **options)[key]
        out = plus(b, merged, parameters["lambda"]).to(base.dtype)
        if not torch.isfinite(out).all():
            raise MergeInputError(f"{key}: the merged value is not finite in {base.dtype} "
                                  f"(lambda={shown(parameters['lambda'])}); merge in a wider "
                                  "dtype or scale the update down")
        return out


def mergekit_method(name):
    """The mergekit method for scoremerge method `name` (not registered)."""
    return ScoremergeMethod(name)
