"""Merging LoRA experts: factored task vectors in, the merged full weights or a merged adapter out.

The result is defined as scoremerge's dense merge (api.merge_task_vectors) of the materialized
task vectors {key: scaling * B @ A}, with lora.methods' low-rank convention where the dense
definitions are ambiguous on low-rank updates. Keys are routed as api routes them: excluded
keys, and 2-D keys too thin for the method's basis (methods.routing.min_rank), take the mean
path (factored too).

SCORE, TSV-M, Iso-C, Iso-CTS, task arithmetic and mean stay factored: per key, memory and time
O((m + n) R + R^3) for R = the sum of the experts' ranks there; an m x n matrix is formed only
for output="full", once per key, when base + alpha * update is written. TIES and MagMax are
entry-wise: they are computed on the materialized updates, key by key (T + about 4 m x n
buffers in the compute dtype per key, e.g. 1.4 GB for a 4096 x 11008 key at T = 4, with one key
in flight per CPU thread), TIES
with scope="tensor" only (a global magnitude ranking would need every key's update at once),
and they cannot give an adapter: their merged update is not low rank.
"""
from dataclasses import dataclass, field

import torch

from ..api import checked_alpha, checked_method, compute_dtype
from ..errors import MergeInputError, shown
from ..parallel import parallel_map
from ..methods.routing import excluded, routes_to_matrix
from ..validate import all_finite, check_dtype, exclude_patterns, overflow_error
from . import methods
from .adapter import Adapter, Target, check_base_copies
from .factored import LowRank, truncate

DENSE_METHODS = ("ties", "magmax")


@dataclass
class MergedAdapter:
    """A merged update per key, factored (alpha included: base + B @ A is the merged weight),
    with each key's Target (how PEFT names it) and, when truncated, the relative Frobenius error
    of the truncation per key (0.0 for exact keys)."""
    updates: dict
    targets: dict
    errors: dict = field(default_factory=dict)


def merge_factored(task_vectors, shapes, method="score", *, exclude=(), dtype=None,
                   backend="auto", **options):
    """Merge T factored task vectors ({key: LowRank} each; a key an expert lacks is a zero
    update there) over the keys of `shapes` ({key: (m, n)}). Returns {key: LowRank} in the
    compute dtype (float32, or float64 when asked or when any factor is), or for TIES and MagMax
    {key: dense merged update}.

    >>> merged = merge_factored([tv1, tv2, tv3], {"w": (4096, 4096)}, "score", variant="diag")
    """
    tvs = list(task_vectors)
    spec, opts = checked_method(method, options, len(tvs))
    if spec.coupling(opts):
        raise MergeInputError(f"{spec.coupling(opts)}; LoRA experts are merged key by key (a "
                              "global ranking would materialize every key's update at once)")
    exclude = exclude_patterns(exclude)
    cdtype = compute_dtype(dtype, any(u.B.dtype == torch.float64 for tv in tvs
                                      for u in tv.values()))
    T = len(tvs)

    def merge_key(key):
        m, n = shapes[key]
        updates = [_folded(tv.get(key), cdtype) for tv in tvs]
        if all(u is None for u in updates):
            raise MergeInputError(f"key {shown(key)}: no expert adapts it")
        thin = spec.kind == "matrix" and not routes_to_matrix((m, n), key, T, exclude, method)
        if excluded(key, exclude) or thin:
            return methods.mean(updates, m, n)
        if method in DENSE_METHODS:
            stacked = torch.stack([u.materialize() if u is not None else
                                   torch.zeros(m, n, dtype=cdtype) for u in updates])
            return spec.fn({key: stacked}, **opts)[key]
        return methods.FACTORED[method](updates, m, n, backend=backend, **opts)

    # Each key's work is a chain of small products and decompositions of m x r and r x r
    # matrices: keys on separate threads with one intra-op thread each beat every op split
    # over all threads: 4-9x on a loaded 2-core machine (SCORE on 7 Llama-shaped keys, T = 4,
    # rank 16: 1.03 s -> 0.25 s).
    return dict(zip(shapes, parallel_map(merge_key, list(shapes))))


def _folded(update, dtype):
    """update with its scaling folded into B, in the compute dtype; None stays None."""
    if update is None:
        return None
    return LowRank(*update.factors(dtype))


def merge_adapters(base, adapters, method="score", *, alpha=1.0, output="full", rank=None,
                   exclude=(), dtype=None, backend="auto", **options):
    """Merge LoRA experts of one base.

    base: {key: tensor} (needed for output="full"), or {key: anything with .shape} such as
    Checkpoint(base).infos for output="adapter". adapters: lora.Adapter objects (load_adapter)
    or mappings {base key: LowRank}. method and options: as for api.merge_task_vectors.
    output="full": {target key: base + alpha * merged update} in the base's dtype.
    output="adapter": a MergedAdapter (alpha folded into it) of rank <= the sum of the ranks, or
    with rank=N every key truncated to rank N and its relative error reported.

    >>> weights = merge_adapters(base, [load_adapter(p, base) for p in paths], "tsv")
    """
    adapters = list(adapters)
    alpha = checked_alpha(alpha)
    if output not in ("full", "adapter"):
        raise MergeInputError(f"output must be 'full' or 'adapter', got {shown(output)}")
    if rank is not None and (output != "adapter" or type(rank) is not int or rank < 1):
        raise MergeInputError(f"rank must be a positive integer and needs output='adapter'; got "
                              f"rank={shown(rank)} with output={shown(output)}")
    if output == "adapter" and method in DENSE_METHODS:
        raise MergeInputError(f"{method} merges entry by entry: its merged update is not low "
                              "rank, so it cannot be written as an adapter; use output='full'")
    tvs, targets = _expert_updates(adapters, base)
    if output == "full" and not all(isinstance(base[k], torch.Tensor) for k in targets):
        raise MergeInputError("output='full' needs the base's tensors, not only their shapes")
    shapes = {key: tuple(base[key].shape) for key in targets}
    merged = merge_factored(tvs, shapes, method, exclude=exclude, dtype=dtype, backend=backend,
                            **options)
    if output == "adapter":
        return _as_adapter(merged, targets, alpha, rank)
    return {key: _full(key, base, update, alpha) for key, update in merged.items()}


def _expert_updates(adapters, base):
    """([{key: LowRank}] per expert, {key: Target} over all), every key checked against base."""
    if not adapters:
        raise MergeInputError("no adapters given: merging needs at least one LoRA expert")
    tvs, targets = [], {}
    for i, adapter in enumerate(adapters):
        updates = adapter.updates if isinstance(adapter, Adapter) else adapter
        if not isinstance(updates, dict) or \
                not all(isinstance(u, LowRank) and u.B.ndim == 2 for u in updates.values()):
            raise MergeInputError(f"adapter {i} must be a lora.Adapter or a mapping of keys to "
                                  "2-D LowRank updates")
        for key, update in updates.items():
            if not (all_finite(update.B) and all_finite(update.A)):
                raise MergeInputError(f"adapter {i}: its update of {shown(key)} contains NaN "
                                      "or Inf")
            if key not in base or tuple(base[key].shape) != tuple(update.shape):
                got = tuple(base[key].shape) if key in base else "no such key"
                raise MergeInputError(f"adapter {i}: its update of {shown(key)} is "
                                      f"{list(update.shape)}; the base has {got}")
            target = adapter.targets[key] if isinstance(adapter, Adapter) else \
                Target(key.removesuffix(".weight"))
            if targets.setdefault(key, target) != target:
                raise MergeInputError(f"adapters disagree on how {shown(key)} is adapted: "
                                      f"{targets[key]} against {target}")
        if isinstance(adapter, Adapter) and \
                all(isinstance(base.get(k), torch.Tensor) for k in adapter.base_copies):
            check_base_copies(adapter, base.__getitem__)
        tvs.append(updates)
    return tvs, targets


def _full(key, base, update, alpha):
    b = base[key]
    check_dtype(key, b.dtype, "the base")
    if not b.is_floating_point():
        raise MergeInputError(f"key {shown(key)} of the base is {b.dtype}: a LoRA target must "
                              "be a floating-point weight")
    delta = update.materialize() if isinstance(update, LowRank) else update
    out = torch.add(b.to(delta.dtype), delta, alpha=alpha).to(b.dtype)
    if not all_finite(out):
        if not all_finite(b):
            raise MergeInputError(f"key {shown(key)} of the base contains NaN or Inf")
        raise overflow_error(key, out, "merged model")
    return out


def _as_adapter(merged, targets, alpha, rank):
    def finish(key):
        update = LowRank(merged[key].B * alpha, merged[key].A)
        error = 0.0
        if rank is not None and update.rank > rank:
            update, err = truncate(update, rank)
            error = float(err)
        for factor in (update.B, update.A):
            if not all_finite(factor):
                raise overflow_error(key, factor, "merged adapter")
        return update, error

    result = MergedAdapter({}, {}, {})
    for key, (update, error) in zip(merged, parallel_map(finish, list(merged))):
        if update.rank:           # a zero update is left out: PEFT has no rank-0 modules
            result.updates[key], result.targets[key], result.errors[key] = \
                update, targets[key], error
    return result
