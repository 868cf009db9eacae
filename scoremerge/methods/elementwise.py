"""Entry-wise baselines over whole state dicts: mean, task arithmetic, MagMax, TIES.

Each takes {key: stacked task tensors [T, ...]} in the compute dtype and returns {key: merged}.
"""
import torch

from .. import ref
from .registry import Option, merge_method


@merge_method("mean", kind="elementwise", entrywise=True,
              reference=ref.methods.mean,
              paper="Wortsman et al., Model soups, ICML 2022",
              summary="uniform average of the task vectors (the mean of the experts)")
def mean(taus):
    return {key: x.mean(dim=0) for key, x in taus.items()}


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
    merged = {}
    for key, x in taus.items():
        # argmax returns the first maximum; over the tasks reversed that is the last one, the
        # MagMax authors' rule (a later task replaces the running choice on equal magnitude)
        last = x.shape[0] - 1 - x.abs().flip(0).argmax(dim=0, keepdim=True)
        merged[key] = torch.gather(x, 0, last)[0]
    return merged


@merge_method(
    "ties", kind="elementwise", reference=ref.methods.ties,
    paper="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023",
    summary="trim each task vector to its largest entries, elect a sign per entry, average "
            "the agreeing values",
    options=[
        Option("density", 0.2, "fraction of each task vector's entries kept", low=0.0,
               high=1.0, low_open=True),
        Option("scope", "global", "rank entries over the whole task vector (global) or per key "
               "(tensor)", choices=("global", "tensor")),
        Option("disjoint", "mean", "how the kept values that agree with the elected sign combine: "
               "mean (the TIES paper), sum (FusionBench's default merge_func) or max (the largest "
               "magnitude with the elected sign)", choices=("mean", "sum", "max")),
        Option("zero_sign", "zero", "an entry whose kept values sum to exactly zero elects no sign "
               "(zero) or the sign most entries of the scope elect (majority: the TIES authors' "
               "code and FusionBench)", choices=("zero", "majority")),
    ])
def ties(taus, *, density=0.2, scope="global", disjoint="mean", zero_sign="zero"):
    groups = [list(taus)] if scope == "global" else [[key] for key in taus]
    merged = {}
    for group in groups:
        merged.update(_ties_scope({k: taus[k] for k in group}, density, disjoint, zero_sign))
    return merged


def _ties_scope(taus, density, disjoint, zero_sign):
    """TIES over keys that share one magnitude ranking and one majority sign."""
    # one threshold per task, from the ranking over every entry of these keys
    threshold = _thresholds(torch.cat([x.flatten(1) for x in taus.values()], dim=1), density)

    def kept(x):
        return torch.where(x.abs() >= threshold.reshape(-1, *([1] * (x.ndim - 1))), x, 0.0)

    majority = None
    if zero_sign == "majority":     # a first pass, so the kept values are never all held at once
        votes = sum(_votes(torch.sign(kept(x).sum(dim=0))) for x in taus.values())
        majority = torch.tensor(float((votes > 0) - (votes < 0)), dtype=threshold.dtype,
                                device=threshold.device)
    merged = {}
    for key, x in taus.items():
        k = kept(x)
        elected = torch.sign(k.sum(dim=0))
        if majority is not None:
            elected = torch.where(elected == 0, majority, elected)
        agree = (torch.sign(k) == elected) & (k != 0)
        merged[key] = _disjoint(k * agree, agree, elected, disjoint)
    return merged


def _votes(signs):
    """Entries electing + minus entries electing -, counted exactly (a float sum of 2^24 or
    more signs is not)."""
    return int((signs > 0).sum()) - int((signs < 0).sum())


def _disjoint(chosen, agree, elected, how):
    """Combine the agreeing kept values chosen [T, ...] (zero elsewhere) over the tasks."""
    if how == "sum":
        return chosen.sum(dim=0)
    if how == "max":
        return chosen.abs().amax(dim=0) * elected
    return chosen.sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _thresholds(flat, density):
    """Per task (row of flat [T, N]): the smallest magnitude among its top round(density * N)
    (see ref.methods._magnitude_threshold)."""
    n_keep = max(1, round(density * flat.shape[1]))
    return flat.abs().kthvalue(flat.shape[1] - n_keep + 1, dim=1).values
