"""ops.entropy_weights: per-batch mixing coefficients from the entropy of K experts' predictions
(the small step of online merging between the expert passes and the mixing kernel). One plain
torch implementation, checked against naive.py's per-expert, per-sample loop."""
import math

import torch

from ...errors import MergeInputError


def entropy_weights(logits, temperature, *, per_sample=False):
    """logits [K, B, C] -> (weights [K] summing to one, entropies [K]), both float32 (float64 for
    float64 logits), on the logits' device.

    entropies[k] is the mean over the batch of the entropy (nats) of softmax(logits[k, b]);
    weights = softmax(-entropies / temperature): a confident expert weighs more, and the
    temperature sets how sharply (-> 0: the most confident expert alone; -> inf: the mean).
    per_sample=True takes that softmax over experts per sample and averages it over the batch.
    Non-finite logits are an error naming the expert (nothing downstream should mix with them).

    >>> w, H = entropy_weights(torch.randn(3, 64, 10), temperature=0.1)
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 3 or 0 in logits.shape:
        raise MergeInputError(f"logits must be [K, B, C] with K, B, C >= 1, got "
                              f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature > 0):
        raise MergeInputError(f"temperature must be a finite number > 0, got {temperature!r}")
    finite = torch.isfinite(logits).flatten(1).all(dim=1)
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        raise MergeInputError(f"the logits of expert(s) {bad} contain NaN or Inf on this batch")
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    logp = torch.log_softmax(z, dim=-1)
    H = -(logp.exp() * logp).sum(dim=-1)                      # [K, B]
    entropies = H.mean(dim=1)
    if per_sample:
        return torch.softmax(-H / temperature, dim=0).mean(dim=1), entropies
    return torch.softmax(-entropies / temperature, dim=0), entropies
