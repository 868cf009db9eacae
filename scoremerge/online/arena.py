"""The flat parameter arena: K experts' floating-point parameters packed once into one [K, N]
buffer, with a table key -> (offset, shape, group), so a per-batch merge is one ops.mix call
writing in place into one N-long buffer that a model's parameters are views of.

Keys are laid out group by group (in state-dict order within a group), so each group is one
contiguous range bounds[g]:bounds[g+1] of the arena: the mixing kernel reads no per-element index.
"""
from dataclasses import dataclass

import torch

from ..errors import MergeInputError
from ..validate import check_models


@dataclass(frozen=True)
class Slot:
    offset: int
    shape: torch.Size
    group: int

    @property
    def size(self):
        return self.shape.numel()


class ParameterArena:
    """experts: K >= 1 state dicts of one architecture (same keys, shapes; no NaN/Inf).
    group_of: key -> group index in range(n_groups) (default: every key in group 0).
    dtype / device: of the packed buffer (default: the first expert's first floating tensor's).
    Integer tensors are left out (they are not mixed)."""

    def __init__(self, experts, *, group_of=None, n_groups=1, dtype=None, device=None):
        experts = list(experts)
        if not experts:
            raise MergeInputError("no experts given: the arena needs at least one state dict")
        check_models(experts, [f"expert {k}" for k in range(len(experts))])
        keys = [k for k, v in experts[0].items() if v.is_floating_point()]
        if not keys:
            raise MergeInputError("the experts hold no floating-point tensors to mix")
        group_of = group_of or (lambda key: 0)
        groups = {}
        for key in keys:
            g = group_of(key)
            if not (isinstance(g, int) and 0 <= g < n_groups):
                raise MergeInputError(f"group_of({key!r}) = {g!r}, not a group in range({n_groups})")
            groups[key] = g
        first = experts[0][keys[0]]
        self.dtype = dtype or first.dtype
        self.device = torch.device(device) if device is not None else first.device
        self.slots, offset, bounds = {}, 0, [0]
        for g in range(n_groups):
            for key in (k for k in keys if groups[k] == g):
                self.slots[key] = Slot(offset, experts[0][key].shape, g)
                offset += experts[0][key].numel()
            bounds.append(offset)
        self.bounds = tuple(bounds)
        self.numel = offset
        self.buffer = torch.empty(len(experts), offset, dtype=self.dtype, device=self.device)
        for k, expert in enumerate(experts):
            for key, slot in self.slots.items():
                self.buffer[k, slot.offset:slot.offset + slot.size].copy_(expert[key].flatten())

    @property
    def n_experts(self):
        return self.buffer.shape[0]

    def views(self, flat):
        """{key: view of `flat` [N] in the key's shape}."""
        if flat.shape != (self.numel,):
            raise ValueError(f"flat must be [{self.numel}], got {tuple(flat.shape)}")
        return {key: flat[s.offset:s.offset + s.size].view(s.shape) for key, s in self.slots.items()}

    def expert(self, k):
        """Expert k's parameters as views into the arena."""
        return self.views(self.buffer[k])

    def bind(self, model, flat=None):
        """Make every arena key's parameter or buffer in `model` a view into one flat [N] buffer
        (allocated when not given) and return that buffer: writing it (ops.mix(..., out=flat))
        changes the model in place. Keys the model lacks, or with another shape, are an error
        raised before anything is changed."""
        flat = torch.empty(self.numel, dtype=self.dtype, device=self.device) if flat is None \
            else flat
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors |= dict(model.named_buffers(remove_duplicate=False))
        missing = [k for k in self.slots if k not in tensors]
        wrong = [f"{k}: model {tuple(tensors[k].shape)}, arena {tuple(s.shape)}"
                 for k, s in self.slots.items() if k in tensors and tensors[k].shape != s.shape]
        if missing or wrong:
            raise MergeInputError("the model does not fit the arena: "
                                  + "; ".join(([f"missing {missing[:5]}"] if missing else [])
                                              + wrong[:5]))
        views = self.views(flat)
        views_of_current = {k: tensors[k].detach() for k in self.slots}
        for key, view in views.items():
            view.copy_(views_of_current[key])            # the model keeps its current values
        for key, view in views.items():
            owner, _, name = key.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if name in module._parameters:
                module._parameters[name].data = view
            else:
                module._buffers[name] = view
        return flat
