"""OnlineMerger: merging of K experts afresh for every unlabeled test batch, from the entropy of
their predictions (docs/algorithms.md, "Entropy-adaptive online merging"), forward passes only.

Per batch x, strategy="entropy" (the paper's reading when calibration=None and groups=1):
  1. every expert on x (K passes, or one vmap pass over the K stacked parameter sets), reading
     its parameters as views of the arena (nothing is copied);
  2. entropies and encoder coefficients (ops.entropy_weights), on calibrated logits when the
     experts ship calibration records (calibration.py), or relative to each expert's running
     mean over the stream (calibration="stream");
  3. the encoder mixed in place by one ops.mix call: the model's parameters are views of the
     flat buffer it writes;
  4. decoupled head: the merged encoder runs once; its features (the head's input) are scored by
     every expert's head; the head coefficients mix the head (one small ops.mix call);
  5. the prediction: the merged head on those features (the encoder is not run again).
groups=G > 1 splits the batch into at most G groups of samples (strategies.group_samples) and
runs steps 3-5 once per group, re-mixing the same flat buffer (no parameter-sized allocation).
strategy="search" evaluates K + 2 coefficient vectors around the step-2 vector by one merged
forward each and keeps the one whose merged prediction has the lowest mean entropy.
Coupled (an ablation): the head takes the encoder's coefficients and the merged model runs once.

Every input check happens before the model is touched, and a batch that fails half-way (its
merged encoder yields non-finite head logits) restores the parameters the model had before it.
"""
import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..errors import MergeInputError, shown
from ..ops import entropy_weights, mix
from .arena import ParameterArena
from .calibration import check_records
from .strategies import (group_entropies, group_samples, sample_entropies, search_candidates,
                         softmax_weights)

ENCODER, HEAD = 0, 1
# Defaults chosen on the demo's tuning seeds 10-14, never the reported ones 0-4, by
# bench/online_strategy_sweep.py (its docstring has the rule); bench/results/
# online_strategy_sweep.json holds every configuration's accuracies and, under "chosen", these:
# "default" is calibration=records (which the caller must supply), groups=6 by coefficients,
# group_prior=64, temp_enc=0.05; "search" is step 0.1, momentum 0.5.
# tests/test_online_strategies.py (test_the_defaults_are_the_tuning_sweeps_choice) checks the
# constants against that file.
GROUPS, GROUP_BY, GROUP_PRIOR = 6, "coefficients", 64.0
SEARCH_STEP, SEARCH_MOMENTUM = 0.1, 0.5
_CHOICES = {"strategy": ("entropy", "search"), "bn": ("batch", "mix"),
            "expert_passes": ("loop", "vmap"), "group_by": ("entropy", "coefficients")}


@dataclass(frozen=True)
class OnlineResult:
    """One batch's outcome. logits [B, C] from the merged model(s); coefficients {"encoder": [K],
    "head": [K]} as mixed (after momentum; with groups, their mean weighted by group size);
    entropies [K]: each expert's mean prediction entropy on the batch, as weighed (calibrated
    when calibration is on); head_entropies [K]: each expert head's on the merged encoder's
    features (None when coupled or searching); groups [B]: each sample's group (None: one
    group); group_coefficients {"encoder": [n, K], "head": [n, K]} per group (None: one group);
    merged_forwards: forward passes of a merged model this batch took (not counting experts')."""
    logits: torch.Tensor
    coefficients: dict
    entropies: torch.Tensor
    head_entropies: torch.Tensor | None
    groups: torch.Tensor | None = None
    group_coefficients: dict | None = None
    merged_forwards: int = 1


class _Weighed(NamedTuple):
    weights: torch.Tensor            # [K] the batch rule's coefficients
    entropies: torch.Tensor          # [K] the batch-mean entropies they come from
    per_sample: torch.Tensor | None  # [K, B] per-sample entropies on the same scale, if needed
    stream: tuple | None             # the running sums after this batch (calibration="stream")


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

    The defaults with calibration records given (calibration=[one record per expert]: at most 6
    groups by coefficients, group_prior 64, temp_enc 0.05) are the configuration chosen on the
    demo's tuning seeds (bench/results/online_strategy_sweep.json); without records the defaults
    group raw entropies. strategy="entropy", calibration=None, groups=1 is the paper's reading.

    Strategies (every one costs the K expert passes; bench/results/online_cpu.json has the times):
    strategy="entropy": coefficients softmax(-entropies / temperature) from the experts' mean
        prediction entropies on the batch. Assumes a confident expert is a competent one. Cost
        beyond the expert passes: one merged forward, two ops.mix calls, K head passes on the
        merged features (decoupled), O(K B C) for the entropies.
    strategy="search": K + 2 candidate vectors shared by the batch (the momentum-smoothed step-2
        vector, that vector moved `search_step` of the way to each expert, the uniform mean),
        each mixed into the whole model (coupled) and run once; the one whose merged prediction
        has the lowest mean entropy (on logits divided by the candidate's mix of the records'
        temperatures, when calibrated) predicts. Assumes the merged model's own confidence ranks
        merges. Cost: K + 2 merged forwards and K + 3 ops.mix calls.
    calibration: None (raw entropies: the paper's reading); K records (one temperature per
        expert, calibration.calibration_record, made on each expert's own held-out data): each
        expert's logits are divided by its record before its entropy is taken, so an entropy
        says how uncertain the expert is here relative to at home; assumes the experts ship one
        number each. Under strategy="entropy" (any groups) the coefficients are then invariant to
        a change of an expert's logit temperature (its logits times c: its record times c); the
        search's centre is too, not its scoring of the merged candidates.
        "stream": each expert's entropies divided by its running mean over the batches so far
        (this one included); needs nothing shipped, but on a stream that never changes domain
        every ratio tends to one and the coefficients to the uniform mean. Cost: O(K B C).
    groups: at most G merged models per batch. Default None: GROUPS (6) for strategy="entropy"
        without momentum or per_sample, else 1. G = 1: one coefficient vector for the batch.
        G > 1: samples grouped by their experts' per-sample entropies (group_by="entropy": the
        log-entropy profiles; "coefficients": the per-sample coefficient vectors, as DaWin),
        each group's coefficients from its mean entropies shrunk towards the batch's by
        group_prior pseudo-samples; G >= B: every sample its own merged model (DaWin without
        clustering; use group_prior=0). Assumes a batch may hold several domains. Cost: n <= G
        groups, each two ops.mix calls and one merged forward of its samples; the model is left
        holding the last group's merge. Needs momentum=0 and per_sample=False.

    temp_enc, temp_head: softmax temperatures over the negated mean entropies (nats). Defaults
        0.05 and 1.0 (bench/online_temperature_sweep.py): a lower temp_enc leans on the most
        confident expert, a higher one blends.
    momentum: coefficients = momentum * previous + (1 - momentum) * this batch's (for "search",
        the centre of the candidates). Default None: 0 (each batch on its own) for "entropy",
        SEARCH_MOMENTUM for "search".
    coupled: the head uses the encoder's coefficients (an ablation; default False, decoupled).
    bn: "batch" (default): BatchNorm layers normalise with the test batch's own statistics, in
        every pass, because the experts' running statistics describe their training domains, not
        the test site; "mix": mix the running statistics with the encoder coefficients.
    per_sample: softmax over experts per sample, then averaged over the batch (default False).
    expert_passes: "loop" (default): K functional passes; "vmap": one torch.func.vmap pass over
        the K stacked parameter sets. Both read the arena.
    backend: for ops.mix (auto | cuda | triton | torch).

    >>> merger = OnlineMerger(model, [sd_a, sd_b, sd_c], calibration=records)
    >>> for x in batches:
    ...     result = merger(x)                     # result.logits, result.coefficients["head"]
    """

    def __init__(self, model, experts, *, head=None, strategy="entropy", calibration=None,
                 groups=None, group_by=GROUP_BY, group_prior=GROUP_PRIOR,
                 search_step=SEARCH_STEP, temp_enc=0.05,
                 temp_head=1.0, momentum=None, coupled=False, bn="batch", per_sample=False,
                 expert_passes="loop", backend="auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        experts = list(experts)
        if not experts:
            raise MergeInputError("no experts given: online merging needs K >= 1 state dicts")
        options = dict(strategy=strategy, groups=groups, group_by=group_by,
                       group_prior=group_prior, search_step=search_step, temp_enc=temp_enc,
                       temp_head=temp_head, momentum=momentum, bn=bn, per_sample=per_sample,
                       expert_passes=expert_passes)
        _check_options(options)
        if momentum is None:
            options["momentum"] = SEARCH_MOMENTUM if strategy == "search" else 0.0
        if groups is None:
            alone = strategy == "search" or options["momentum"] or per_sample
            options["groups"] = 1 if alone else GROUPS
        if calibration is None or isinstance(calibration, str):
            if calibration not in (None, "stream"):
                raise MergeInputError("calibration must be None, 'stream' or one record per "
                                      f"expert (K temperatures), got {shown(calibration)}")
            self.records, self.calibration = None, calibration
        else:
            self.records, self.calibration = check_records(calibration, len(experts)), "records"
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
        for name, value in options.items():
            setattr(self, name, value)
        self.coupled, self.backend = bool(coupled), backend
        self._record_t = None if self.records is None else torch.tensor(self.records,
                                                                         device=first.device)
        self._bind_views(model)
        self._held = None                        # the (a_enc, a_head) the flat buffer holds
        self.reset()
        self._checked_output = False

    def _bind_views(self, model):
        """Views of the arena, made once: expert k's pass reads row k in place, and vmap the K
        rows; BatchNorm running statistics stay out of the passes under bn="batch"."""
        self._batch_stats = _batchnorms(model) if self.bn == "batch" else []
        skip = {f"{name}.{buf}" for name, m in model.named_modules() if m in self._batch_stats
                for buf in ("running_mean", "running_var")}
        K, buffer = self.n_experts, self.arena.buffer
        self._stacked = {key: buffer[:, s.offset:s.offset + s.size].view(K, *s.shape)
                         for key, s in self.arena.slots.items() if key not in skip}
        cut = len(self._head_name) + 1
        self._expert_heads = [{key[cut:]: view for key, view in self.arena.expert(k).items()
                               if key in self.head_keys and key not in skip} for k in range(K)]

    @property
    def n_experts(self):
        return self.arena.n_experts

    def reset(self):
        """Start a new stream: forget momentum and the running entropies (calibration="stream").
        The model keeps its current parameters."""
        self._previous = None                    # last batch's (a_enc, a_head), for momentum
        self._stream = (torch.zeros(self.n_experts, device=self.flat.device), 0)

    @torch.no_grad()
    def __call__(self, x):
        """Adapt to batch x [B, ...] (B >= 1) and predict it: an OnlineResult."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"the batch must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise MergeInputError(f"empty batch (shape {tuple(x.shape)}): nothing to adapt to")
        self.model.eval()
        with self._batch_statistics():
            weighed = self._weigh(self._expert_logits(x))
            restore = self._restore_point()
            try:
                result, held, previous = self._adapt(x, weighed)
            except BaseException:
                restore()
                raise
        self._held, self._previous = held, previous
        if weighed.stream is not None:
            self._stream = weighed.stream
        return result

    def _weigh(self, logits):
        """The batch rule's coefficients and the entropies behind them (ops.entropy_weights
        checks the logits first), plus per-sample entropies where grouping or the running
        calibration needs them."""
        calibrated = self._calibrated(logits)
        weights, entropies = entropy_weights(calibrated, self.temp_enc, per_sample=self.per_sample)
        if self.calibration != "stream" and self.groups == 1:
            return _Weighed(weights, entropies, None, None)
        per_sample = sample_entropies(calibrated)
        if self.calibration != "stream":
            return _Weighed(weights, entropies, per_sample, None)
        total, n = self._stream
        running = (total + entropies) / (n + 1)
        per_sample = per_sample / running.clamp_min(torch.finfo(running.dtype).tiny)[:, None]
        ratios = per_sample.mean(dim=1)
        weights = (torch.softmax(-per_sample / self.temp_enc, dim=0).mean(dim=1)
                   if self.per_sample else softmax_weights(ratios, self.temp_enc))
        return _Weighed(weights, ratios, per_sample, (total + entropies, n + 1))

    def _calibrated(self, logits):
        """Expert logits [K, ...] divided by each expert's record (unchanged without records)."""
        if self._record_t is None:
            return logits
        return logits / self._record_t.to(logits.dtype).view(-1, *([1] * (logits.ndim - 1)))

    def _adapt(self, x, weighed):
        """(OnlineResult, coefficients the flat buffer now holds, momentum state)."""
        if self.strategy == "search":
            return self._search(x, weighed)
        labels = None
        if self.groups > 1:
            labels = group_samples(weighed.per_sample, self.groups, self.group_by, self.temp_enc,
                                   min_size=2 if self._batch_stats else 1)
            if int(labels.max()) == 0:
                labels = None                    # one group: exactly the batch strategy
        if labels is not None:
            return self._grouped(x, weighed, labels)
        a_enc = self._smooth(weighed.weights, 0)
        logits, a_head, head_entropies = self._merge_and_predict(x, a_enc)
        result = OnlineResult(logits, {"encoder": a_enc, "head": a_head}, weighed.entropies,
                              head_entropies)
        return result, (a_enc, a_head), (a_enc, a_head)

    def _grouped(self, x, weighed, labels):
        """One merged model per group of samples, mixed in turn into the same flat buffer."""
        enc = softmax_weights(group_entropies(weighed.per_sample, labels, self.group_prior),
                              self.temp_enc)
        out, head, head_entropies = None, [], []
        for g, a_enc in enumerate(enc):
            members = (labels == g).nonzero().flatten()
            logits, a_head, h = self._merge_and_predict(x[members], a_enc)
            if out is None:
                out = logits.new_empty(x.shape[0], *logits.shape[1:])
            out[members] = logits
            head.append(a_head)
            head_entropies.append(h)
        head = torch.stack(head)
        share = torch.bincount(labels).to(enc.dtype) / x.shape[0]
        result = OnlineResult(
            out, {"encoder": share @ enc, "head": share @ head}, weighed.entropies,
            None if self.coupled else share @ torch.stack(head_entropies), groups=labels,
            group_coefficients={"encoder": enc, "head": head}, merged_forwards=len(enc))
        return result, (enc[-1], head[-1]), self._previous

    def _search(self, x, weighed):
        """Forward-only search over search_candidates around the smoothed batch rule."""
        candidates = search_candidates(self._smooth(weighed.weights, 0), self.search_step)
        best = None
        for i, c in enumerate(candidates):
            self._mix(c, c)
            logits = self.model(x)
            if not torch.isfinite(logits).all():
                continue
            scale = 1.0 if self._record_t is None else (c @ self._record_t.to(c.dtype)).item()
            score = sample_entropies((logits / scale).unsqueeze(0)).mean().item()
            if best is None or score < best[0]:
                best = (score, i, logits)
        if best is None:
            raise MergeInputError("every candidate merge's logits contain NaN or Inf on this batch")
        _, i, logits = best
        chosen = candidates[i]
        if i != len(candidates) - 1:
            self._mix(chosen, chosen)
        result = OnlineResult(logits, {"encoder": chosen, "head": chosen}, weighed.entropies,
                              None, merged_forwards=len(candidates))
        return result, (chosen, chosen), (chosen, chosen)

    def _merge_and_predict(self, x, a_enc):
        """Mix the encoder (and head) for samples x; (logits, a_head, head entropies or None)."""
        if self.coupled:
            self._mix(a_enc, a_enc)
            logits = self.model(x)
            if not torch.isfinite(logits).all():
                raise MergeInputError("the merged model's logits contain NaN or Inf on this batch")
            return logits, a_enc, None
        self._mix(a_enc, None)
        features = self._head_input(x)
        head_logits = torch.stack([functional_call(self.head_module, p, (features,))
                                   for p in self._expert_heads])
        a_head, head_entropies = entropy_weights(self._calibrated(head_logits), self.temp_head,
                                                 per_sample=self.per_sample)
        a_head = self._smooth(a_head, 1)
        self._mix(None, a_head)
        return self.head_module(features), a_head, head_entropies

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
        """A function that puts the parameters back as they are now: by re-mixing the
        coefficients the flat buffer holds (the kernel is deterministic), or from a copy before
        the first batch."""
        if self._held is not None:
            held = self._held
            return lambda: self._mix(*held)
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


def _check_options(o):
    """Every option of OnlineMerger but the model, experts, head and records, before any work."""
    for name, choices in _CHOICES.items():
        if o[name] not in choices:
            raise MergeInputError(f"{name} must be one of {', '.join(map(repr, choices))}, got "
                                  f"{shown(o[name])}")
    for name in ("temp_enc", "temp_head"):
        if not (_is_number(o[name]) and math.isfinite(o[name]) and o[name] > 0):
            raise MergeInputError(f"{name} must be a finite number > 0, got {shown(o[name])}")
    if o["momentum"] is not None and not (_is_number(o["momentum"]) and 0 <= o["momentum"] < 1):
        raise MergeInputError(f"momentum must be in [0, 1), got {shown(o['momentum'])}")
    if not (_is_number(o["search_step"]) and 0 < o["search_step"] <= 1):
        raise MergeInputError(f"search_step must be in (0, 1], got {shown(o['search_step'])}")
    if not (_is_number(o["group_prior"]) and math.isfinite(o["group_prior"])
            and o["group_prior"] >= 0):
        raise MergeInputError(f"group_prior must be a finite number >= 0, got "
                              f"{shown(o['group_prior'])}")
    if o["groups"] is None:
        return
    if not (isinstance(o["groups"], int) and not isinstance(o["groups"], bool)
            and o["groups"] >= 1):
        raise MergeInputError(f"groups must be an integer >= 1, got {shown(o['groups'])}")
    if o["groups"] > 1 and (o["momentum"] or o["per_sample"] or o["strategy"] == "search"):
        raise MergeInputError("groups > 1 needs momentum=0, per_sample=False and "
                              "strategy='entropy': groups are not matched across batches, and "
                              "the search shares one vector across the batch")


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


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
