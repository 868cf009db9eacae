"""Every merge method of docs/algorithms.md as a literal per-key loop in plain torch.

This is the ground truth the batched backends are tested against and the baseline they are
benchmarked against: readable first, fast never. Each matrix method takes the list of one key's
task matrices and returns that key's merged task matrix; `merge_task_vectors` loops over keys.
"""
import re

import torch

from ..ops.linalg.naive import polar, truncated_svd
from ..ops.projection.naive import project_and_mask, reconstruct

MATRIX_METHODS = ("score", "tsv", "iso_c", "iso_cts")
WEIGHTED_METHODS = ("mean", "ties")        # take the weights themselves (merge_task_vectors)


def score(taus, *, variant="full", trim_multiplier=1.96, trim_per_task=True):
    """SCORE for one key: taus is a list of T task matrices [m, n]."""
    T = len(taus)
    k = min(taus[0].shape) // T
    Ustar, _, Vstar = _shared_basis(taus, k)
    S = project_and_mask(torch.stack(taus), Ustar, Vstar, variant=variant,
                         trim_multiplier=trim_multiplier, trim_per_task=trim_per_task)
    return reconstruct(Ustar, S, Vstar)


def tsv(taus):
    """TSV-M for one key: the shared basis with each task's own top-k singular values."""
    k = min(taus[0].shape) // len(taus)
    Ustar, scat, Vstar = _shared_basis(taus, k)
    return Ustar @ torch.diag(scat) @ Vstar


def _shared_basis(taus, k):
    """Steps 1-3: per-task top-k SVDs, concatenated, orthogonalised by the polar factor."""
    Us, Ss, Vhs = zip(*(truncated_svd(tau, k) for tau in taus))
    return polar(torch.cat(Us, dim=1)), torch.cat(Ss), polar(torch.cat(Vhs, dim=0))


def iso_c(taus):
    """Iso-C for one key: the summed task matrix with a flat spectrum at its mean value."""
    U, s, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return s.mean() * (U @ Vh)


def iso_cts_sizes(r, T, common_space_fraction=0.8):
    """(common size c, per-task size n_t) of Iso-CTS for rank r and T tasks (docs/algorithms.md)."""
    c = int(common_space_fraction * r)
    ts = round((r - c) / T) * T
    return r - ts, ts // T


def iso_cts(taus, *, common_space_fraction=0.8):
    """Iso-CTS for one key: common space of the sum plus each task's own residual directions."""
    T = len(taus)
    c, n_t = iso_cts_sizes(min(taus[0].shape), T, common_space_fraction)
    U, s, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    Uc, sc, Vhc = U[:, :c], s[:c], Vh[:c]
    blocks = []
    for tau in taus:
        w = tau - Uc @ (Uc.mT @ tau)
        blocks.append(truncated_svd(w, n_t))
    Ucat = torch.cat([b[0] for b in blocks] + [Uc], dim=1)
    scat = torch.cat([b[1] for b in blocks] + [sc])
    Vcat = torch.cat([b[2] for b in blocks] + [Vhc], dim=0)
    return scat.mean() * (polar(Ucat) @ polar(Vcat))


def mean(taus, *, weights=None):
    if weights is None:
        return sum(taus) / len(taus)
    return sum(w * tau for w, tau in zip(weights, taus)) / sum(weights)


def linear(models, *, normalize=True, weights=None):
    """The experts' weights averaged (normalize) or summed with the per-expert weights."""
    weights = [1.0] * len(models) if weights is None else list(weights)
    total = sum(w * x for w, x in zip(weights, models))
    return total / sum(weights) if normalize else total


def task_arithmetic(taus):
    return sum(taus)


def magmax(taus):
    """Per entry, the task value of largest magnitude; on equal magnitudes the later task wins,
    as in the MagMax authors' code (a running selection replaced where |tau_t| >= |best|)."""
    best = taus[0]
    for tau in taus[1:]:
        best = torch.where(tau.abs() >= best.abs(), tau, best)
    return best


def ties(task_vectors, keys, *, density=0.2, scope="global", disjoint="mean", zero_sign="zero",
         trim="threshold", weights=None):
    """TIES-merging over the given keys of T task vectors (dicts); returns {key: merged}.

    Trim: keep each task vector's top round(density * N) entries by magnitude, ranked over
    all the given keys at once (scope="global") or per key (scope="tensor"). Elect: a sign per
    entry from the sum of kept values; where that sum is exactly zero, no sign, or with
    zero_sign="majority" the sign elected by more entries of the scope than the other, with
    "plus" +. Disjoint mean: average the kept values that agree (disjoint="sum" adds them, "max"
    takes the largest magnitude with the elected sign). density: one value, or one per task.
    trim="exact" keeps exactly max(1, int(density * N)) entries, the first of a descending sort
    of the float32 magnitudes (mergekit). weights: the kept values of task t are multiplied by
    w_t, and the disjoint mean divides by the sum of the agreeing tasks' weights (1 where that is
    0).
    """
    T = len(task_vectors)
    densities = list(density) if isinstance(density, (list, tuple)) else [density] * T
    weights = [1.0] * T if weights is None else [float(w) for w in weights]
    groups = [keys] if scope == "global" else [[key] for key in keys]
    kept = [dict() for _ in task_vectors]
    for t, tv in enumerate(task_vectors):
        for group in groups:
            flat = torch.cat([tv[key].reshape(-1) for key in group])
            if trim == "exact":
                mask = _exact_mask(flat, densities[t])
            else:
                mask = flat.abs() >= _magnitude_threshold(flat, densities[t])
            start = 0
            for key in group:
                x = tv[key]
                part = mask[start:start + x.numel()].reshape(x.shape)
                start += x.numel()
                kept[t][key] = torch.where(part, x, torch.zeros_like(x)) * weights[t]
    elected = {key: torch.sign(torch.stack([kt[key] for kt in kept]).sum(dim=0)) for key in keys}
    if zero_sign == "plus":
        for key in keys:
            elected[key] = torch.where(elected[key] == 0, 1.0, elected[key])
    if zero_sign == "majority":
        for group in groups:
            votes = sum(int((elected[k] > 0).sum()) - int((elected[k] < 0).sum()) for k in group)
            majority = 1.0 if votes > 0 else -1.0 if votes < 0 else 0.0
            for key in group:
                elected[key] = torch.where(elected[key] == 0, majority, elected[key])
    merged = {}
    for key in keys:
        stacked = torch.stack([kt[key] for kt in kept])
        agree = (torch.sign(stacked) == elected[key]) & (stacked != 0)
        chosen = stacked * agree
        if disjoint == "sum":
            merged[key] = chosen.sum(dim=0)
        elif disjoint == "max":
            merged[key] = chosen.abs().amax(dim=0) * elected[key]
        else:
            w = torch.tensor(weights, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.ndim - 1)))
            divisor = (w * agree).sum(dim=0)
            merged[key] = chosen.sum(dim=0) / torch.where(divisor == 0, 1.0, divisor)
    return merged


def _exact_mask(flat, density):
    """Exactly max(1, int(density * N)) entries of flat (all for density >= 1): the first of a
    descending sort of their float32 magnitudes."""
    if density >= 1:
        return torch.ones_like(flat, dtype=torch.bool)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.argsort(flat.abs().float(), descending=True)[:max(1, int(density * flat.numel()))]] = True
    return mask


def _magnitude_threshold(flat, density):
    """The smallest magnitude among the top max(1, round(density * N)) entries of `flat`.

    round, not ceil: 0.3 * 10 is 3.0000000000000004 in floating point. Entries tied with the
    threshold are all kept."""
    n_keep = max(1, round(density * flat.numel()))
    return flat.abs().kthvalue(flat.numel() - n_keep + 1).values


def routes_to_matrix(key, tensor, T, exclude, method=None):
    """The matrix path: 2-D, not excluded, and a basis for `method`. SCORE and TSV-M split the
    rank into T per-task blocks of min(m, n) // T directions and need that to be at least 1;
    Iso-C and Iso-CTS decompose the summed matrix and need only min(m, n) >= 1. Written again
    here on purpose (methods/routing.py is the fast path's): the reference shares no code with
    what it checks, so a routing slip there shows up as a disagreement."""
    needed = 1 if method in ("iso_c", "iso_cts") else T
    return (tensor.ndim == 2 and not any(re.search(p, key) for p in exclude)
            and min(tensor.shape) >= needed)


def merge_task_vectors(task_vectors, method, *, exclude=(), weights=None, **options):
    """Merge T task vectors (dicts of float tensors, all in one dtype) key by key. weights: one
    number per task vector; mean and TIES take them as defined there, every other method (and
    the mean path of excluded or thin keys) merges the scaled task vectors w_t tau_t."""
    T = len(task_vectors)
    keys = list(task_vectors[0])
    excluded = {k for k in keys if any(re.search(p, k) for p in exclude)}
    if weights is not None and method not in WEIGHTED_METHODS:
        task_vectors = [{k: w * x for k, x in tv.items()} for w, tv in zip(weights, task_vectors)]
        weights = None
    given = {} if weights is None else {"weights": weights}
    scaled = task_vectors if weights is None else \
        [{k: w * x for k, x in tv.items()} for w, tv in zip(weights, task_vectors)]
    out = {}
    if method == "ties":
        out.update(ties(task_vectors, [k for k in keys if k not in excluded], **options, **given))
    for key in keys:
        if key in out:
            continue
        taus = [tv[key] for tv in task_vectors]
        if method in MATRIX_METHODS:
            if routes_to_matrix(key, taus[0], T, exclude, method):
                out[key] = globals()[method](taus, **options)
            else:
                out[key] = mean(taus)
        elif key in excluded:
            out[key] = mean([tv[key] for tv in scaled])
        else:
            out[key] = globals()[method](taus, **options, **given)
    return {key: out[key] for key in keys}
