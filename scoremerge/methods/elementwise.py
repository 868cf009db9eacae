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
              summary="per entry, the task value of largest magnitude")
def magmax(taus):
    return {key: torch.gather(x, 0, x.abs().argmax(dim=0, keepdim=True))[0]
            for key, x in taus.items()}


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
    ])
def ties(taus, *, density=0.2, scope="global"):
    keys = list(taus)
    if scope == "global":
        flat = torch.cat([taus[k].flatten(1) for k in keys], dim=1)
        thresholds = {k: _thresholds(flat, density) for k in keys}
    else:
        thresholds = {k: _thresholds(taus[k].flatten(1), density) for k in keys}
    merged = {}
    for key in keys:
        x = taus[key]
        t = thresholds[key].reshape(-1, *([1] * (x.ndim - 1)))
        kept = torch.where(x.abs() >= t, x, 0.0)
        agree = (torch.sign(kept) == torch.sign(kept.sum(dim=0))) & (kept != 0)
        merged[key] = (kept * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return merged


def _thresholds(flat, density):
    """Per task (row of flat [T, N]): the smallest magnitude among its top round(density * N)
    (see ref.methods._magnitude_threshold)."""
    n_keep = max(1, round(density * flat.shape[1]))
    return flat.abs().kthvalue(flat.shape[1] - n_keep + 1, dim=1).values
