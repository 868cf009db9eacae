"""Calibration records: one temperature per expert that makes the K experts' prediction
entropies comparable before OnlineMerger weighs them.

An expert's record is the temperature T at which the mean entropy of softmax(logits / T) over its
own held-out source data equals a reference entropy (the same for every expert). Dividing the
expert's logits by T at test time then measures its entropy on the test batch relative to how
uncertain it is at home: an expert that is confident everywhere (the one closest to the
pretraining domain, say) no longer outweighs one that is competent on the target. The record
needs no labels, only the expert's own data, and is made once, where that data lives.

Scaling an expert's logits by a constant c (a change of its temperature) scales its record by c,
so the calibrated logits, and the coefficients, do not change.
"""
import math

import torch
from torch.func import functional_call

from ..errors import MergeInputError

REFERENCE_ENTROPY = 0.3          # nats; chosen on the demo's tuning seeds (bench/results/)
_BISECTIONS = 200                # log T to float64 resolution whatever the bracket
_BRACKET_STEPS = 64              # 2^64 either way covers any finite logit scale


@torch.no_grad()
def calibration_record(model, state, x, *, reference_entropy=REFERENCE_ENTROPY, batch=1024):
    """The record of the expert `state` (a state dict for `model`): matched_temperature of its
    logits on x, a batch of its own held-out source data [N, ...]. Cost: one forward pass over x
    (in eval mode, with the expert's own normalisation statistics) and a scalar search."""
    if not isinstance(x, torch.Tensor) or x.ndim == 0 or x.shape[0] == 0:
        raise MergeInputError("the calibration record needs a non-empty batch of the expert's own "
                              "data")
    was_training = model.training
    model.eval()
    try:
        logits = torch.cat([functional_call(model, state, (x[i:i + batch],))
                            for i in range(0, len(x), batch)])
    finally:
        model.train(was_training)
    return matched_temperature(logits, reference_entropy)


def matched_temperature(logits, reference_entropy=REFERENCE_ENTROPY):
    """T > 0 such that the mean over the rows of logits [N, C] of the entropy (nats) of
    softmax(logits / T) equals reference_entropy (0 < reference < ln C). The mean entropy rises
    with T, so a bisection on log T in float64 finds it. Cost: about 260 softmaxes of [N, C]."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or 0 in logits.shape:
        raise MergeInputError(f"logits must be [N, C] with N, C >= 1, got "
                              f"{tuple(getattr(logits, 'shape', ()))}")
    C = logits.shape[1]
    if not (isinstance(reference_entropy, (int, float)) and 0 < reference_entropy < math.log(C)):
        raise MergeInputError(f"reference_entropy must lie in (0, ln C = {math.log(C):.3f}), got "
                              f"{reference_entropy!r}")
    if not torch.isfinite(logits).all():
        raise MergeInputError("the calibration logits contain NaN or Inf")
    z = logits.double()

    def excess(log_t):
        logp = torch.log_softmax(z / math.exp(log_t), dim=1)
        return (-(logp.exp() * logp).sum(dim=1).mean() - reference_entropy).item()

    lo, hi = 0.0, 0.0
    for _ in range(_BRACKET_STEPS):
        if excess(lo) < 0:
            break
        lo -= 1.0
    for _ in range(_BRACKET_STEPS):
        if excess(hi) > 0:
            break
        hi += 1.0
    if not excess(lo) < 0 < excess(hi):
        raise MergeInputError(f"no temperature gives a mean entropy of {reference_entropy} nats "
                              "on these logits (rows with tied top logits keep their entropy at "
                              "any temperature)")
    for _ in range(_BISECTIONS):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return math.exp((lo + hi) / 2)


def check_records(records, K):
    """records: K finite temperatures > 0 (one per expert, in the experts' order; a sequence of
    numbers or a 1-D tensor) -> tuple of floats."""
    if isinstance(records, torch.Tensor):
        records = records.tolist() if records.ndim == 1 else [records]
    try:
        records = tuple(records)
    except TypeError:
        raise MergeInputError(f"calibration must be one record per expert (K temperatures), got "
                              f"{type(records).__name__}") from None
    if len(records) != K:
        raise MergeInputError(f"calibration needs one record per expert: {K} experts, "
                              f"{len(records)} records")
    for k, t in enumerate(records):
        if isinstance(t, bool) or not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise MergeInputError(f"calibration record {k} must be a finite temperature > 0, "
                                  f"got {t!r}")
    return tuple(float(t) for t in records)
