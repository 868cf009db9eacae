"""The coefficient rules behind OnlineMerger's strategies, on small tensors (K experts, a batch
of B samples): per-sample entropies, running-statistics calibration, grouping a batch by the
experts' per-sample entropies, the coefficients of a group, and the search's candidates.

Everything here costs O(K * B * C) or less per batch (C classes), against the K expert passes
and the merged forwards that dominate a batch: bench/results/online_cpu.json has the figures.
"""
import torch

_LLOYD_STEPS = 10
_LOG_FLOOR = 1e-6                # nats: a one-hot prediction's entropy, kept finite in log space


def sample_entropies(logits):
    """logits [K, B, C] (finite) -> [K, B]: the entropy (nats) of each expert's prediction for
    each sample, float32 (float64 for float64 logits), as ops.entropy_weights computes them."""
    z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def softmax_weights(entropies, temperature):
    """entropies [..., K] -> convex weights [..., K]: softmax(-entropies / temperature) over the
    last dimension, the rule of ops.entropy_weights applied to entropies already reduced (or
    calibrated)."""
    return torch.softmax(-entropies / temperature, dim=-1)


def group_samples(entropies, max_groups, by="entropy", temperature=1.0, min_size=1):
    """entropies [K, B] -> labels [B] (int64, groups numbered 0.. in order of first sample):
    at most max_groups groups of samples whose experts' entropies look alike.

    by="entropy": the samples' log-entropy profiles across the experts; by="coefficients": their
    per-sample coefficient vectors softmax(-entropies[:, b] / temperature), as DaWin clusters.
    Deterministic k-means: the first centre is the sample farthest from the batch's mean, each
    next one the sample farthest from the centres so far, then a fixed number of Lloyd steps;
    groups left empty are dropped, and samples with one profile always share a group, so
    max_groups >= B gives every distinct sample its own group. A group smaller than min_size
    gives up its centre and its samples join the nearest remaining one (BatchNorm with batch
    statistics needs two samples). Cost: O(10 * B * max_groups * K)."""
    B = entropies.shape[1]
    if by == "coefficients":
        points = torch.softmax(-entropies / temperature, dim=0).T
    else:
        points = entropies.clamp_min(_LOG_FLOOR).log().T                  # [B, K]
    distance = ((points - points.mean(dim=0)) ** 2).sum(dim=1)
    centres = points[distance.argmax()].unsqueeze(0)
    while len(centres) < max_groups:
        distance = torch.cdist(points, centres).min(dim=1).values
        if distance.max() == 0:
            break                                        # fewer distinct profiles than groups
        centres = torch.cat([centres, points[distance.argmax()].unsqueeze(0)])
    if len(centres) == B and min_size <= 1:
        return torch.arange(B, device=entropies.device)      # every sample is a centre
    for _ in range(_LLOYD_STEPS):
        labels = torch.cdist(points, centres).argmin(dim=1)
        counts = torch.bincount(labels, minlength=len(centres)).unsqueeze(1)
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
    labels = torch.cdist(points, centres).argmin(dim=1)
    counts = torch.bincount(labels, minlength=len(centres))
    while len(centres) > 1 and int(counts.min()) < min_size:
        centres = centres[torch.arange(len(centres), device=centres.device) != counts.argmin()]
        labels = torch.cdist(points, centres).argmin(dim=1)
        counts = torch.bincount(labels, minlength=len(centres))
    return _renumber(labels)


def _renumber(labels):
    """Labels 0..n-1 in the order their groups first appear, with no empty group."""
    order = list(dict.fromkeys(labels.tolist()))
    mapping = torch.empty(max(order) + 1, dtype=torch.int64, device=labels.device)
    mapping[torch.tensor(order, device=labels.device)] = torch.arange(len(order),
                                                                      device=labels.device)
    return mapping[labels]


def group_entropies(entropies, labels, prior):
    """entropies [K, B], labels [B] (groups 0..n-1), prior >= 0 -> [n, K]: each group's mean
    entropies, shrunk towards the batch's as if the batch mean were `prior` more samples: a
    group selected for one expert's low entropies would otherwise over-trust that expert."""
    n = int(labels.max()) + 1
    sums = entropies.new_zeros(n, entropies.shape[0]).index_add_(0, labels, entropies.T)
    counts = torch.bincount(labels, minlength=n).to(entropies.dtype).unsqueeze(1)
    return (sums + prior * entropies.mean(dim=1)) / (counts + prior)


def search_candidates(centre, step):
    """centre [K] (convex) -> [K + 2, K]: the centre, the centre moved a fraction `step` of the
    way to each expert's vertex, and the uniform vector; every row convex."""
    K = centre.shape[0]
    vertices = torch.eye(K, dtype=centre.dtype, device=centre.device)
    moved = centre + step * (vertices - centre)
    uniform = torch.full((1, K), 1 / K, dtype=centre.dtype, device=centre.device)
    return torch.cat([centre.unsqueeze(0), moved, uniform])
