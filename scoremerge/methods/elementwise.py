"""Entry-wise baselines over whole state dicts: mean, task arithmetic, MagMax, TIES, linear.

Each takes {key: stacked task tensors [T, ...]} in the compute dtype (linear: the experts'
weights) and returns {key: merged}. Per-expert weights reach mean, TIES and linear as `weights`
(a [T] tensor, or None for all ones); the other methods get task vectors already scaled by them.
"""
import math

import torch

from .. import ref
from ..parallel import parallel_map
from ..validate import all_finite
from .entrywise import CPU_CHUNK
from .registry import Option, merge_method
from .sort_prefix import argsort_prefix_mask, compiled

# kth_largest: from this many entries on, bracket the answer with a sample of about _SAMPLE
_SAMPLED_SELECTION, _SAMPLE = 1 << 20, 1 << 16


@merge_method("mean", kind="elementwise", entrywise=True, weighted=True,
              reference=ref.methods.mean,
              paper="Wortsman et al., Model soups, ICML 2022",
              summary="average of the task vectors (the mean of the experts; with weights, "
                      "sum_t w_t tau_t / sum_t w_t)")
def mean(taus, *, weights=None):
    if weights is None:
        return {key: x.mean(dim=0) for key, x in taus.items()}
    return {key: (x * per_task(weights, x)).sum(dim=0) / weights.sum() for key, x in taus.items()}


@merge_method("linear", kind="elementwise", entrywise=True, weighted=True, on_models=True,
              reference=ref.methods.linear,
              paper="Wortsman et al., Model soups, ICML 2022 (mergekit's `linear`)",
              summary="weighted average of the experts' weights themselves, in mergekit's "
                      "arithmetic; the base only names the keys",
              options=[Option("normalize", True, "divide by the sum of the weights")])
def linear(models, *, normalize=True, weights=None):
    merged = {}
    for key, x in models.items():
        w = torch.ones(len(x), dtype=x.dtype, device=x.device) if weights is None else weights
        # accumulated expert by expert from zero, then divided: mergekit's order, so its
        # results are met to the bit in float32
        out = torch.zeros_like(x[0])
        for t in range(len(x)):
            out.addcmul_(x[t], w[t])
        merged[key] = out.div_(w.sum()) if normalize else out
    return merged


@merge_method("task_arithmetic", kind="elementwise", entrywise=True,
              reference=ref.methods.task_arithmetic,
              paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
              summary="sum of the task vectors; alpha scales it")
def task_arithmetic(taus):
    return {key: x.sum(dim=0) for key, x in taus.items()}


@merge_method("magmax", kind="elementwise", entrywise=True,
              reference=ref.methods.magmax,
              paper="Marczak et al., MagMax: Leveraging Model Merging for Seamless Continual "
                    "Learning, ECCV 2024",
              summary="per entry, the task value of largest magnitude (the later task on ties)")
def magmax(taus):
    return {key: _largest_magnitude(x) for key, x in taus.items()}


def _largest_magnitude(x):
    """x [T, ...] -> the entry of largest magnitude over T, the later task on ties: the MagMax
    authors' running selection (3x faster here than an argmax over T and a gather), in place in
    three buffers (1.6x faster than fresh tensors per task, [8, 256K] on one thread).

    A NaN never wins a comparison, so the selection alone would drop a NaN of any task but the
    first; the running maximum of the magnitudes carries it (torch.maximum propagates NaN) and
    puts it back, so a NaN input always reaches the merged entry (methods.entrywise relies on
    that instead of scanning the inputs)."""
    best = x[0].clone()
    size = best.abs()
    magnitude, later = torch.empty_like(size), torch.empty_like(size, dtype=torch.bool)
    for tau in x[1:]:
        torch.abs(tau, out=magnitude)
        torch.ge(magnitude, size, out=later)
        torch.where(later, tau, best, out=best)
        torch.maximum(size, magnitude, out=size)
    if not all_finite(size):
        best = torch.where(torch.isnan(size), size, best)
    return best


@merge_method(
    "ties", kind="elementwise", weighted=True, reference=ref.methods.ties,
    couples_keys=lambda options: None if options["scope"] == "tensor" else (
        "ties with scope=global ranks entries over the whole model (scope='tensor', "
        "--option scope=tensor, ranks them per key)"),
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
    summary="trim each task vector to its largest entries, elect a sign per entry, average "
            "the agreeing values",
    options=[
        Option("density", 0.2, "fraction of each task vector's entries kept (one value, or "
               "one per expert)", low=0.0, high=1.0, low_open=True, per_model=True),
        Option("scope", "global", "rank entries over the whole task vector (global) or per key "
               "(tensor)", choices=("global", "tensor")),
        Option("disjoint", "mean", "how the kept values that agree with the elected sign combine: "
               "mean (the TIES paper), sum (FusionBench's default merge_func) or max (the largest "
               "magnitude with the elected sign)", choices=("mean", "sum", "max")),
        Option("zero_sign", "zero", "an entry whose kept values sum to exactly zero elects no sign "
               "(zero), the sign most entries of the scope elect (majority: the TIES authors' "
               "code and FusionBench) or + (plus: mergekit)",
               choices=("zero", "majority", "plus")),
        Option("trim", "threshold", "keep round(density * N) entries and every entry tied with "
               "the smallest of them (threshold: the TIES authors' code), or exactly "
               "max(1, int(density * N)) entries in the order of a descending sort of their "
               "float32 magnitudes (exact: mergekit)", choices=("threshold", "exact")),
    ])
def ties(taus, *, density=0.2, scope="global", disjoint="mean", zero_sign="zero",
         trim="threshold", weights=None):
    groups = [list(taus)] if scope == "global" else [[key] for key in taus]
    merged = {}
    for group in groups:
        merged.update(_ties_scope({k: taus[k] for k in group}, density, disjoint, zero_sign,
                                  trim, weights))
    return merged


def _ties_scope(taus, density, disjoint, zero_sign, trim, weights):
    """TIES over keys that share one magnitude ranking and one majority sign. Weights scale
    each task's kept values (so the ranking is the unweighted one, as in mergekit) and make the
    disjoint mean a weighted one: sum_t w_t k_t / sum_t w_t over the agreeing t.

    Once the ranking has given each task its threshold (or, for a tie across mergekit's cut, its
    mask), every merged entry depends only on the same entry of the task vectors: the keys are
    merged in cache-sized chunks of entries across the CPU threads, the same arithmetic as on
    the whole key (so the same bits) without its [T, N] temporaries."""
    trimmed = _trimmer(taus, density, trim)
    if weights is not None:
        def kept(key, x, start):
            return trimmed(key, x, start) * per_task(weights, x)
    else:
        kept = trimmed

    majority = None
    if zero_sign != "zero":         # a first pass, so the kept values are never all held at once
        votes = 1 if zero_sign == "plus" else \
            sum(_votes(torch.sign(kept(key, x.flatten(1), 0).sum(dim=0)))
                for key, x in taus.items())
        majority = float((votes > 0) - (votes < 0))

    def merge_chunk(key, x, start):
        k = kept(key, x, start)
        elected = torch.sign(k.sum(dim=0))
        if majority is not None:
            elected = torch.where(elected == 0, majority, elected)
        agree = (torch.sign(k) == elected) & (k != 0)
        return _disjoint(k * agree, agree, elected, disjoint, weights)

    merged = {}
    for key, x in taus.items():
        flat = x.flatten(1)
        out = torch.empty(flat.shape[1], dtype=x.dtype, device=x.device)

        def run(span, key=key, flat=flat, out=out):
            for lo in range(span[0], span[1], CPU_CHUNK):
                hi = min(span[1], lo + CPU_CHUNK)
                out[lo:hi] = merge_chunk(key, flat[:, lo:hi], lo)

        n = flat.shape[1]
        if x.device.type == "cpu":
            parts = min(torch.get_num_threads(), -(-n // CPU_CHUNK))
            bounds = [n * i // parts for i in range(parts + 1)] if n else []
            parallel_map(run, list(zip(bounds, bounds[1:])))
        else:
            out[:] = merge_chunk(key, flat, 0)
        merged[key] = out.view(x.shape[1:])
    return merged


def _trimmer(taus, density, trim):
    """kept(key, x, start): x [T, L] (the key's entries start .. start + L, flattened) with the
    entries outside each task's top fraction `density` zeroed, the ranking over every entry of
    these keys."""
    flat = next(iter(taus.values())).flatten(1) if len(taus) == 1 else \
        torch.cat([x.flatten(1) for x in taus.values()], dim=1)
    densities = density if isinstance(density, tuple) else (density,) * flat.shape[0]
    if trim == "threshold":
        threshold = _thresholds(flat, densities)[:, None]

        def kept(key, x, start):
            return torch.where(x.abs() >= threshold, x, 0.0)
        return kept
    thresholds, masks = _exact_thresholds(flat, densities)
    thresholds = thresholds[:, None]
    offsets, at = {}, 0
    for key, x in taus.items():
        offsets[key] = at
        at += x[0].numel()
    del flat

    def kept(key, x, start):
        # compared in float32, the precision mergekit ranks in, whatever the compute dtype; a
        # product with the 0/1 mask, as mergekit's, so a dropped negative entry is -0.0 there too
        keep = x.abs().float() >= thresholds
        for t, mask in masks.items():
            keep[t] = mask[offsets[key] + start:offsets[key] + start + x.shape[1]]
        return x * keep
    return kept


def _exact_thresholds(flat, densities):
    """Which entries of each row of flat [T, N] mergekit keeps: exactly max(1, int(d_t * N))
    (all for d_t >= 1), the first of a descending argsort of the float32 magnitudes. Returns
    (thresholds [T], {t: bool mask [N]}): where the k-th largest magnitude is the only way to
    pick k entries (no tie across the cut), "magnitude >= threshold" is that very set, found by
    a selection in O(N) instead of a sort; rows with a tie across the cut take the argsort's
    own choice (a mask: its order among equal values is the sort's own, found without the sort
    where that is safe, see sort_prefix). Where the compiled replay runs, every row takes its
    mask, which costs less than the selection. The rows are ranked in parallel on a CPU."""
    def rank(t):
        if densities[t] >= 1:
            return 0.0, None                              # threshold 0 keeps every entry
        magnitude = flat[t].abs().float()                # a fresh tensor: scratch
        keep = max(1, int(densities[t] * magnitude.numel()))
        if magnitude.device.type == "cpu" and compiled():
            return 0.0, argsort_prefix_mask(magnitude, keep, scratch=True)
        threshold = kth_largest(magnitude, keep)
        if int(torch.count_nonzero(magnitude >= threshold)) == keep:
            return threshold, None
        # quantized task vectors (a difference of bf16 or nearby fp32 weights) tie at the cut
        # almost always
        return 0.0, argsort_prefix_mask(magnitude, keep, scratch=True)

    ranked = parallel_map(rank, range(flat.shape[0])) if flat.device.type == "cpu" else \
        [rank(t) for t in range(flat.shape[0])]
    thresholds = torch.tensor([float(threshold) for threshold, _ in ranked],
                              dtype=torch.float32, device=flat.device)
    return thresholds, {t: mask for t, (_, mask) in enumerate(ranked) if mask is not None}


def kth_largest(values, k):
    """The k-th largest of the 1-D tensor `values` (1 <= k <= n), exactly. For large n a
    strided sample brackets it first, and only the entries inside the bracket are selected from
    (a few cheap passes instead of one slow full selection: 65M float32 entries, kthvalue
    1.4 s on this CPU); when the bracket misses, the full selection runs."""
    n = values.numel()
    if n >= _SAMPLED_SELECTION:
        sample = values[::n // _SAMPLE].sort().values
        s = sample.numel()
        below = (n - k) / n                             # the fraction under the k-th largest
        margin = 4.0 / math.sqrt(s)
        lo = sample[max(0, int((below - margin) * s))]
        hi = sample[min(s - 1, int((below + margin) * s))]
        above = int(torch.count_nonzero(values > hi))
        if above < k:
            band = values[(values >= lo) & (values <= hi)]
            need = k - above                            # the need-th largest of the band
            if need <= band.numel():
                return band.kthvalue(band.numel() - need + 1).values
    return values.kthvalue(n - k + 1).values


def per_task(weights, x):
    """weights [T] shaped to multiply x [T, ...] task by task."""
    return weights.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _votes(signs):
    """Entries electing + minus entries electing -, counted exactly (a float sum of 2^24 or
    more signs is not)."""
    return int(torch.count_nonzero(signs > 0)) - int(torch.count_nonzero(signs < 0))


def _disjoint(chosen, agree, elected, how, weights):
    """Combine the agreeing kept values chosen [T, ...] (zero elsewhere) over the tasks."""
    if how == "sum":
        return chosen.sum(dim=0)
    if how == "max":
        return chosen.abs().amax(dim=0) * elected
    if weights is None:
        return chosen.sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    divisor = (per_task(weights, chosen) * agree).sum(dim=0)
    return chosen.sum(dim=0) / torch.where(divisor == 0, 1.0, divisor)


def _thresholds(flat, densities):
    """Per task (row of flat [T, N]): the smallest magnitude among its top round(d_t * N)
    (see ref.methods._magnitude_threshold)."""
    N = flat.shape[1]
    return torch.stack([kth_largest(row.abs(), max(1, round(d * N)))
                        for row, d in zip(flat, densities)])
