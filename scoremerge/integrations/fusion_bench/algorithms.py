"""scoremerge's methods as FusionBench algorithm classes.

Each class takes the constructor arguments of FusionBench 0.2.33's class of the same name (so a
Hydra `_target_` swap is the whole migration), and `run(modelpool)` returns the pretrained
module holding base + scaling * (scoremerge's merged task vector), computed by scoremerge's
batched methods on the fabric's device. Where FusionBench's conventions differ from the papers,
the paper's is the default and `fusion_bench_compat=True` reproduces FusionBench's.
"""
from collections.abc import Iterable

import torch
from fusion_bench import BaseAlgorithm
from fusion_bench.mixins import LightningFabricMixin, auto_register_config

from ... import api
from ...validate import check_models, exclude_patterns
from ._pool import (exact_names, load_merged, load_state, pretrained_and_experts,
                    pretrained_and_task_vectors)


class ScoremergeAlgorithm(BaseAlgorithm, LightningFabricMixin):
    """The shared run(); a subclass names its scoremerge method and maps its arguments."""
    method = None

    def merge_options(self, taus):
        """scoremerge options for `method`, from the constructor's arguments."""
        return {}

    def excluded_names(self):
        return getattr(self, "exclude_keys", None) or ()

    def scaling(self):
        return self.scaling_factor

    def prepare(self, taus):
        return taus

    def finish(self, tau, n_tasks):
        return tau

    @torch.no_grad()
    def run(self, modelpool):
        plain = type(self).prepare is ScoremergeAlgorithm.prepare and \
            type(self).finish is ScoremergeAlgorithm.finish
        if plain and api.methods()[self.method].entrywise:
            return self._run_entrywise(modelpool)
        pretrained, taus = pretrained_and_task_vectors(modelpool)
        taus = self.prepare(taus)
        tau = api.merge_task_vectors(taus, self.method, exclude=exact_names(self.excluded_names()),
                                     device=self.fabric.device, **self.merge_options(taus))
        tau = self.finish(tau, len(taus))
        return load_merged(pretrained, tau, self.scaling(), getattr(self, "inplace", True))


    def _run_entrywise(self, modelpool):
        """Task arithmetic and MagMax in one pass over pretrained and experts, key by key in
        cache-sized chunks (methods.entrywise), no task vector held whole: the same arithmetic,
        FusionBench's order of operations included, so the same bits as the path above."""
        pretrained, base, experts, names = pretrained_and_experts(modelpool)
        spec, opts = api.checked_method(self.method, self.merge_options(None), len(experts))
        check_models([base, *experts], names, values=False)
        merged = api.merge_checked(base, experts, spec, opts, alpha=self.scaling(),
                                   exclude=exclude_patterns(exact_names(self.excluded_names())),
                                   device=self.fabric.device, names=names)
        return load_state(pretrained, merged, getattr(self, "inplace", True))


@auto_register_config
class ScoreMergingAlgorithm(ScoremergeAlgorithm):
    """SCORE (no FusionBench counterpart); arguments as FusionBench's Iso-C plus SCORE's options
    (variant full | diag | offdiag | untrimmed, trim_multiplier, trim_per_task)."""
    method = "score"

    def __init__(self, scaling_factor=1.0, variant="full", trim_multiplier=1.96,
                 trim_per_task=True, exclude_keys=None, **kwargs):
        super().__init__(**kwargs)

    def merge_options(self, taus):
        return {"variant": self.variant, "trim_multiplier": self.trim_multiplier,
                "trim_per_task": self.trim_per_task}


@auto_register_config
class TaskSingularVectorMerging(ScoremergeAlgorithm):
    """TSV-M. alpha: None, a number scaling the merged task vector, or one number per task
    scaling the task vectors before merging. fusion_bench_compat: keys too thin for one
    direction per task become zero, as in FusionBench (default: the mean, as scoremerge does)."""
    method = "tsv"

    def __init__(self, alpha=None, exclude_keys=None, return_single_task_models=False,
                 fusion_bench_compat=False, **kwargs):
        if return_single_task_models:
            raise NotImplementedError(
                "return_single_task_models=True (each task's own model in the shared basis) is "
                "not implemented by scoremerge; use fusion_bench.method.TaskSingularVectorMerging")
        super().__init__(**kwargs)

    def _per_task(self):
        return isinstance(self.alpha, Iterable) and not isinstance(self.alpha, str)

    def prepare(self, taus):
        if not self._per_task():
            return taus
        if len(self.alpha) != len(taus):
            raise ValueError(f"alpha has {len(self.alpha)} values for {len(taus)} models")
        return [{k: a * x for k, x in tv.items()} for a, tv in zip(self.alpha, taus)]

    def scaling(self):
        return None if self._per_task() else self.alpha

    def finish(self, tau, n_tasks):
        if not self.fusion_bench_compat:
            return tau
        skip = set(self.excluded_names())
        # FusionBench gives each task int(r * (1 / T)) directions (not r // T: for T = 49 and
        # r = 49 that is 0); with none, its concatenated basis and spectrum are all zero
        return {k: torch.zeros_like(x) if x.ndim == 2 and k not in skip
                and int(min(x.shape) * (1 / n_tasks)) == 0 else x for k, x in tau.items()}


@auto_register_config
class IsotropicMergingInCommonSubspace(ScoremergeAlgorithm):
    """Iso-C."""
    method = "iso_c"

    def __init__(self, scaling_factor, exclude_keys=None, **kwargs):
        super().__init__(**kwargs)


@auto_register_config
class IsotropicMergingInCommonAndTaskSubspace(ScoremergeAlgorithm):
    """Iso-CTS."""
    method = "iso_cts"

    def __init__(self, scaling_factor, common_space_fraction, exclude_keys=None, **kwargs):
        super().__init__(**kwargs)

    def merge_options(self, taus):
        return {"common_space_fraction": self.common_space_fraction}


@auto_register_config
class TiesMergingAlgorithm(ScoremergeAlgorithm):
    """TIES, ranked over the whole task vector. threshold: the fraction kept (above 1, a
    percentage, as in FusionBench). merge_func: mean (the paper's disjoint mean), sum or max.
    remove_keys take the mean of the task vectors. fusion_bench_compat: keep int(N K) + 1
    entries per task vector, FusionBench's count, instead of round(N K), and give an entry
    whose kept values cancel exactly the sign most entries elect (FusionBench and the TIES
    authors' code) instead of none."""
    method = "ties"

    def __init__(self, scaling_factor, threshold, remove_keys=None, merge_func="mean",
                 fusion_bench_compat=False, **kwargs):
        super().__init__(**kwargs)

    def excluded_names(self):
        return self.remove_keys or ()

    def merge_options(self, taus):
        density = self.threshold / 100 if self.threshold > 1 else self.threshold
        options = {"scope": "global", "disjoint": str(self.merge_func).split("-")[-1]}
        if self.fusion_bench_compat:
            removed = set(self.excluded_names())
            n = sum(x.numel() for k, x in taus[0].items() if k not in removed)
            return {**options, "density": (int(n * density) + 1) / n, "zero_sign": "majority"}
        return {**options, "density": density}


@auto_register_config
class TaskArithmeticAlgorithm(ScoremergeAlgorithm):
    """Task arithmetic: base + scaling_factor * the sum of the task vectors."""
    method = "task_arithmetic"

    def __init__(self, scaling_factor, inplace=True, **kwargs):
        super().__init__(**kwargs)


@auto_register_config
class MagMaxAlgorithm(ScoremergeAlgorithm):
    """MagMax: per entry the task value of largest magnitude, the later task on ties."""
    method = "magmax"

    def __init__(self, scaling_factor=0.5, inplace=True, **kwargs):
        super().__init__(**kwargs)


ISO_C_Merge = IsotropicMergingInCommonSubspace
ISO_CTS_Merge = IsotropicMergingInCommonAndTaskSubspace
