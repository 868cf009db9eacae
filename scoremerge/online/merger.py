"""OnlineMerger: entropy-adaptive merging of K experts per unlabeled test batch (ALGORITHMS.md,
"Entropy-adaptive online merging"), forward passes only, one merged model for the prediction.

Per batch x:
  1. every expert on x (K passes, or one vmap pass over the K stacked parameter sets), reading
     its parameters as views of the arena (nothing is copied);
  2. entropies and encoder coefficients (ops.entropy_weights);
  3. the encoder mixed in place by one ops.mix call: the model's parameters are views of the
     flat buffer it writes;
  4. decoupled head: the merged encoder runs once; its features (the head's input) are scored by
     every expert's head; the head coefficients mix the head (one small ops.mix call);
  5. the prediction: the merged head on those features (the encoder is not run again).
Coupled (an ablation): the head takes the encoder's coefficients and the merged model runs once.

Every input check happens before the model is touched, and a batch that fails half-way (its
merged encoder yields non-finite head logits) restores the parameters the model had before it.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..errors import MergeInputError
from ..ops import entropy_weights, mix
from .arena import ParameterArena

ENCODER, HEAD = 0, 1


@dataclass(frozen=True)
class OnlineResult:
    """One batch's outcome. logits [B, C] from the single merged model; coefficients
    {"encoder": [K], "head": [K]} as mixed (after momentum); entropies [K]: each expert's mean
    prediction entropy on the batch; head_entropies [K]: each expert head's on the merged
    encoder's features (None when coupled)."""
    logits: torch.Tensor
    coefficients: dict
    entropies: torch.Tensor
    head_entropies: torch.Tensor | None


class OnlineMerger:
    """Merge K experts into `model` afresh for every batch, from the entropy of their predictions.

    model: an nn.Module of the experts' architecture whose last layer is the head (its output is
        the model's output). Its floating-point parameters and buffers become views of one flat
        buffer and are overwritten by every call; the merger puts it in eval mode.
    experts: K >= 1 state dicts with the model's floating-point keys and shapes.
    head: which keys are the classification head: a key prefix ("head", "fc"), a predicate
        key -> bool, or None for the parameters of the model's last nn.Linear (in module order,
        which is the head in timm, torchvision and Hugging Face classifiers). The head's keys must
        make up one submodule, whose input is the features the expert heads are scored on.
    temp_enc, temp_head: softmax temperatures over the negated mean entropies (nats). Defaults
        0.05 and 1.0, the best pair of a sweep over the demo's online streams on a training seed
        that is not reported (bench/online_temperature_sweep.py, results in bench/results/).
        There the experts' entropies differ by tenths of a nat up to a nat: a lower temp_enc
        leans on the most confident expert (better on single-domain streams), a higher one
        blends (better on streams mixing two domains); 0.02-0.1 balance the two. The expert
        heads' entropies on shared features differ little, and temp_head moved accuracy by
        under half a point over 0.01-1.
    momentum: coefficients = momentum * previous + (1 - momentum) * this batch's. Default 0:
        fully online, each batch on its own (streams may switch domain at any batch).
    coupled: the head uses the encoder's coefficients (an ablation; default False, decoupled).
    bn: "batch" (default): BatchNorm layers normalise with the test batch's own statistics, in
        every pass, because the experts' running statistics describe their training domains, not
        the test site; "mix": mix the running statistics with the encoder coefficients.
    per_sample: softmax over experts per sample, then averaged over the batch. Default False:
        the softmax of the batch-mean entropies, ALGORITHMS.md's reading. On the demo's seed-1
        streams the two tie overall (72.7%); per-sample is better on streams mixing two domains
        (71.1 vs 67.5) and worse on single-domain ones (73.6 vs 75.2).
    expert_passes: "loop" (default): K functional passes; "vmap": one torch.func.vmap pass over
        the K stacked parameter sets. On the CPU the loop was faster at every size measured
        (bench/test_online_cpu.py); on a GPU vmap may win for small models. Both read the arena.
    backend: for ops.mix (auto | cuda | triton | torch).

    >>> merger = OnlineMerger(model, [sd_a, sd_b, sd_c])
    >>> for x in batches:
    ...     result = merger(x)                     # result.logits, result.coefficients["head"]
    """

    def __init__(self, model, experts, *, head=None, temp_enc=0.05, temp_head=1.0, momentum=0.0,
                 coupled=False, bn="batch", per_sample=False, expert_passes="loop",
                 backend="auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        experts = list(experts)
        if not experts:
            raise MergeInputError("no experts given: online merging needs K >= 1 state dicts")
        for name, t in (("temp_enc", temp_enc), ("temp_head", temp_head)):
            if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
                raise MergeInputError(f"{name} must be a finite number > 0, got {t!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise MergeInputError(f"momentum must be in [0, 1), got {momentum!r}")
        if bn not in ("batch", "mix"):
            raise MergeInputError(f"bn must be 'batch' or 'mix', got {bn!r}")
        if expert_passes not in ("loop", "vmap"):
            raise MergeInputError(f"expert_passes must be 'loop' or 'vmap', got {expert_passes!r}")

        state = {k: v for k, v in model.state_dict(keep_vars=True).items() if v.is_floating_point()}
        if not state:
            raise MergeInputError("the model has no floating-point parameters to merge")
        floating = [k for k, v in experts[0].items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if set(floating) != set(state):
            missing, extra = set(state) - set(floating), set(floating) - set(state)
            raise MergeInputError("the experts' floating-point keys are not the model's: "
                                  f"experts lack {sorted(missing)[:5]}, have extra "
                                  f"{sorted(extra)[:5]}")
        self.head_keys = _select_head(model, head, floating)
        self._head_name = _head_module_name(self.head_keys, floating, head)
        self.head_module = model.get_submodule(self._head_name)
        first = next(iter(state.values()))
        self.arena = ParameterArena(
            experts, group_of=lambda k: HEAD if k in self.head_keys else ENCODER, n_groups=2,
            dtype=first.dtype, device=first.device)
        self.flat = self.arena.bind(model)       # validates, then rebinds; the model is unchanged
        self.model = model.eval()

        self.temp_enc, self.temp_head = float(temp_enc), float(temp_head)
        self.momentum, self.coupled, self.bn = float(momentum), bool(coupled), bn
        self.per_sample, self.expert_passes, self.backend = bool(per_sample), expert_passes, backend
        self._batch_stats = _batchnorms(model) if bn == "batch" else []
        skip = {f"{name}.{buf}" for name, m in model.named_modules() if m in self._batch_stats
                for buf in ("running_mean", "running_var")}
        K, buffer = self.n_experts, self.arena.buffer
        # Views of the arena, made once: expert k's pass reads row k in place, and vmap the K rows.
        self._stacked = {key: buffer[:, s.offset:s.offset + s.size].view(K, *s.shape)
                         for key, s in self.arena.slots.items() if key not in skip}
        cut = len(self._head_name) + 1
        self._expert_heads = [{key[cut:]: view for key, view in self.arena.expert(k).items()
                               if key in self.head_keys and key not in skip} for k in range(K)]
        self._previous = None                    # last batch's (a_enc, a_head), for momentum
        self._checked_output = False

    @property
    def n_experts(self):
        return self.arena.n_experts

    @torch.no_grad()
    def __call__(self, x):
        """Adapt to batch x [B, ...] (B >= 1) and predict it: an OnlineResult."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"the batch must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise MergeInputError(f"empty batch (shape {tuple(x.shape)}): nothing to adapt to")
        self.model.eval()
        with self._batch_statistics():
            logits = self._expert_logits(x)                        # [K, B, C]
            a_enc, entropies = entropy_weights(logits, self.temp_enc, per_sample=self.per_sample)
            a_enc = self._smooth(a_enc, 0)
            restore = self._restore_point()
            try:
                return self._merge_and_predict(x, a_enc, entropies)
            except BaseException:
                restore()
                raise

    def _merge_and_predict(self, x, a_enc, entropies):
        if self.coupled:
            self._mix(a_enc, a_enc)
            logits, head_entropies, a_head = self.model(x), None, a_enc
            if not torch.isfinite(logits).all():
                raise MergeInputError("the merged model's logits contain NaN or Inf on this batch")
        else:
            self._mix(a_enc, None)
            features = self._head_input(x)
            head_logits = torch.stack([functional_call(self.head_module, p, (features,))
                                       for p in self._expert_heads])
            a_head, head_entropies = entropy_weights(head_logits, self.temp_head,
                                                     per_sample=self.per_sample)
            a_head = self._smooth(a_head, 1)
            self._mix(None, a_head)
            logits = self.head_module(features)
        self._previous = (a_enc, a_head)
        return OnlineResult(logits, {"encoder": a_enc, "head": a_head}, entropies, head_entropies)

    def _expert_logits(self, x):
        """[K, B, C]: every expert on x, its parameters read from the arena."""
        stacked = self._stacked
        if not self._checked_output:
            self._check_head_is_last(x, {k: v[0] for k, v in stacked.items()})
        if self.expert_passes == "vmap":
            return vmap(lambda p: functional_call(self.model, p, (x,)))(stacked)
        return torch.stack([functional_call(self.model, {k: v[i] for k, v in stacked.items()},
                                            (x,)) for i in range(self.n_experts)])

    def _check_head_is_last(self, x, params):
        """The prediction is head(features); that is the model's output only if the head is the
        model's last layer. Checked once, on the first batch, before anything is written."""
        seen = []
        handle = self.head_module.register_forward_hook(lambda m, i, out: seen.append(out))
        try:
            out = functional_call(self.model, params, (x,))
        finally:
            handle.remove()
        if not (len(seen) == 1 and seen[0] is out):
            raise MergeInputError(
                f"the head module {self._head_name!r} must be the model's last layer, "
                "called once, its output being the model's output (got "
                f"{len(seen)} call(s){'' if len(seen) != 1 else ', another output'}); name the "
                "head with head=")
        self._checked_output = True

    def _head_input(self, x):
        captured = []
        handle = self.head_module.register_forward_pre_hook(
            lambda m, args: captured.append(args[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[0]

    def _mix(self, a_enc, a_head):
        """Write the merged groups into the flat buffer the model's parameters view."""
        buffer, (lo, mid, hi) = self.arena.buffer, self.arena.bounds
        if a_enc is not None and a_head is not None:
            mix(buffer, torch.stack([a_enc, a_head]), self.arena.bounds, out=self.flat,
                backend=self.backend)
            return
        start, stop, coeffs = (lo, mid, a_enc) if a_enc is not None else (mid, hi, a_head)
        mix(buffer[:, start:stop], coeffs, out=self.flat[start:stop], backend=self.backend)

    def _smooth(self, a, group):
        if self._previous is None or self.momentum == 0:
            return a
        return self.momentum * self._previous[group] + (1 - self.momentum) * a

    def _restore_point(self):
        """A function that puts the parameters back as they are now: by re-mixing the previous
        batch's coefficients (the kernel is deterministic), or from a copy before the first."""
        if self._previous is not None:
            previous = self._previous
            return lambda: self._mix(*previous)
        saved = self.flat.clone()
        return lambda: self.flat.copy_(saved)

    @contextlib.contextmanager
    def _batch_statistics(self):
        """BatchNorm layers without running statistics normalise with the batch's own, and
        update nothing (the arena's copies are left alone)."""
        saved = [(m, m.running_mean, m.running_var) for m in self._batch_stats]
        for m, _, _ in saved:
            m.running_mean = m.running_var = None
        try:
            yield
        finally:
            for m, mean, var in saved:
                m.running_mean, m.running_var = mean, var


def _select_head(model, head, keys):
    """The head's keys among the experts' floating-point keys."""
    if head is None:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise MergeInputError("the model has no nn.Linear layer to take as the head; name "
                                  "the head's keys with head= (a prefix or a predicate)")
        prefix = linears[-1]
        chosen = [k for k in keys if k.rpartition(".")[0] == prefix]
    elif isinstance(head, str):
        chosen = [k for k in keys if k == head or k.startswith(head + ".")]
    elif callable(head):
        chosen = [k for k in keys if head(k)]
    else:
        raise TypeError(f"head must be None, a key prefix or a predicate, got {type(head).__name__}")
    if not chosen:
        raise MergeInputError(f"head={head!r} selects none of the experts' floating-point keys")
    if len(chosen) == len(keys):
        raise MergeInputError(f"head={head!r} selects every key: nothing is left for the encoder")
    return frozenset(chosen)


def _head_module_name(head_keys, keys, head):
    """The deepest module holding every head key, which must hold no encoder key."""
    owners = [k.split(".")[:-1] for k in head_keys]
    common = owners[0]
    for parts in owners[1:]:
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    name = ".".join(common)
    inside = [k for k in keys if not name or k.startswith(name + ".")]
    strays = sorted(set(inside) - head_keys)
    if not name or strays:
        raise MergeInputError(f"head={head!r}: the head's keys must make up one submodule; "
                              f"{'they span the whole model' if not name else name!r} "
                              f"{'' if not name else 'also holds ' + repr(strays[:5])}")
    return name


def _batchnorms(model):
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
