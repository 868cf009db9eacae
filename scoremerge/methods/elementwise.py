"""Entry-wise baselines over whole state dicts: mean, task arithmetic, MagMax, TIES, linear.

Each takes {key: stacked task tensors [T, ...]} in the compute dtype (linear: the experts'
weights) and returns {key: merged}. Per-expert weights reach mean, TIES and linear as `weights`
(a [T] tensor, or None for all ones); the other methods get task vectors already scaled by them.
"""
import torch

from .. import ref
from ..parallel import parallel_map, thread_shares
from ..validate import all_finite
from .entrywise import CPU_CHUNK
from .registry import Option, merge_method
from .ties_ranking import majority_sign, rank_in_memory, rank_streamed, votes


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


class _TiesInSpans:
    """TIES per tensor over a key merged span by span (a streaming merge's key larger than its
    memory budget): the whole key ranked first, reading it again span by span, then each span
    merged as _ties_scope merges its chunks, to the same bits."""

    @staticmethod
    def applies(options):
        return options["scope"] == "tensor"

    @staticmethod
    def rank(key, read, spans, n, n_tasks, options, weights, dtype, device):
        """The key's Ranking. read(tasks, start, stop) -> those tasks' task vectors over the
        entries [start, stop), [len(tasks), stop - start] in the compute dtype `dtype` on
        `device`; spans: (start, stop) pairs that cover the key's n entries; weights: a [T]
        tensor in dtype, or None."""
        ranking = rank_streamed(key, read, spans, n, _densities(options["density"], n_tasks),
                                options["trim"], dtype, device)
        tasks = list(range(n_tasks))
        return _with_majority(ranking, options["zero_sign"], weights,
                              ((key, read(tasks, lo, hi), lo) for lo, hi in spans))

    @staticmethod
    def merge(taus, ranking, start, options, weights=None):
        """{key: merged} for taus {key: [T, L]}, the entries start .. start + L of the key."""
        return {key: _merged_in_chunks(ranking, key, x, start, options["disjoint"], weights)
                for key, x in taus.items()}


@merge_method(
    "ties", kind="elementwise", weighted=True, reference=ref.methods.ties, in_spans=_TiesInSpans,
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
    flat = next(iter(taus.values())).flatten(1) if len(taus) == 1 else \
        torch.cat([x.flatten(1) for x in taus.values()], dim=1)
    offsets, at = {}, 0
    for key, x in taus.items():
        offsets[key] = at
        at += x[0].numel()
    ranking = rank_in_memory(flat, _densities(density, flat.shape[0]), trim, offsets)
    del flat
    # the vote is a first pass, so the kept values are never all held at once
    _with_majority(ranking, zero_sign, weights,
                   ((key, x.flatten(1), 0) for key, x in taus.items()))
    return {key: _merged_in_chunks(ranking, key, x, 0, disjoint, weights)
            for key, x in taus.items()}


def per_task(weights, x):
    """weights [T] shaped to multiply x [T, ...] task by task."""
    return weights.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _densities(density, n_tasks):
    return density if isinstance(density, tuple) else (density,) * n_tasks


def _with_majority(ranking, zero_sign, weights, pieces):
    """ranking, its majority sign set for zero_sign "plus" or "majority": the latter's vote is
    counted over pieces, (key, x [T, L], start) triples that cover the scope, read only then."""
    if zero_sign != "zero":
        ranking.majority = majority_sign(zero_sign, 0 if zero_sign == "plus" else sum(
            _chunk_votes(ranking, key, x, start, weights) for key, x, start in pieces))
    return ranking


def _chunk_votes(ranking, key, x, start, weights):
    """The majority vote count of x [T, L], the key's entries start .. start + L."""
    return votes(torch.sign(ranking.kept(key, x, start, weights).sum(dim=0)))


def _merged_in_chunks(ranking, key, x, start, disjoint, weights):
    """TIES of x [T, ...], the key's entries start .. start + x[0].numel(), ranked: in
    CPU_CHUNK chunks, spread over the CPU threads."""
    flat = x.flatten(1)
    out = torch.empty(flat.shape[1], dtype=x.dtype, device=x.device)

    def run(span):
        for lo in range(span[0], span[1], CPU_CHUNK):
            hi = min(span[1], lo + CPU_CHUNK)
            out[lo:hi] = _merged_chunk(ranking, key, flat[:, lo:hi], start + lo, disjoint,
                                       weights)

    if x.device.type == "cpu":
        parallel_map(run, thread_shares(flat.shape[1], CPU_CHUNK))
    else:
        out[:] = _merged_chunk(ranking, key, flat, start, disjoint, weights)
    return out.view(x.shape[1:])


def _merged_chunk(ranking, key, x, start, disjoint, weights):
    k = ranking.kept(key, x, start, weights)
    elected = torch.sign(k.sum(dim=0))
    if ranking.majority is not None:
        elected = torch.where(elected == 0, ranking.majority, elected)
    agree = (torch.sign(k) == elected) & (k != 0)
    return _disjoint(k * agree, agree, elected, disjoint, weights)


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
