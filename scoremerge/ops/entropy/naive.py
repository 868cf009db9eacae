"""Plain-torch reference for entropy-adaptive coefficients (docs/algorithms.md, "Entropy-adaptive
online merging", steps 1, 2 and 4), written one expert and one sample at a time."""
import math

import torch


def prediction_entropy(z):
    """Shannon entropy (nats) of softmax(z) for one logit vector z [C], in float64."""
    p = [math.exp(v) for v in (z.double() - z.double().max()).tolist()]
    total = sum(p)
    return -sum((q / total) * math.log(q / total) for q in p if q > 0)


def entropy_weights(logits, temperature, per_sample=False):
    """logits [K, B, C] of K experts on one batch -> (weights [K], entropies [K]), float64.

    entropies[k] = mean_b H(softmax(logits[k, b])). Batch mode: weights = softmax(-entropies /
    temperature). Per-sample mode: the softmax over experts is taken per sample, then averaged over
    the batch."""
    K, B, _ = logits.shape
    H = [[prediction_entropy(logits[k, b]) for b in range(B)] for k in range(K)]
    entropies = torch.tensor([sum(row) / B for row in H], dtype=torch.float64)
    if not per_sample:
        return _softmax([-h / temperature for h in entropies.tolist()]), entropies
    per = [_softmax([-H[k][b] / temperature for k in range(K)]) for b in range(B)]
    return sum(per) / B, entropies


def _softmax(values):
    top = max(values)
    e = [math.exp(v - top) for v in values]
    return torch.tensor([v / sum(e) for v in e], dtype=torch.float64)
