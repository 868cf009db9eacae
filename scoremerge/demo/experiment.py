"""Leave-one-domain-out merging on rotated digits: for every target rotation, merge the experts of
the other rotations with every registered method and test the merged model on the target; then
the online section (online.py): the same experts merged per unlabeled test batch.

Per target: the merged model at a fixed alpha (1.0, as in SCORE's code), and, when an alpha grid
is given, the merged model at the alpha that scores best on the source domains' validation splits
(the target is never looked at). References: the base, each expert on its own domain, the best
single source expert on the target (chosen in hindsight) and the logit ensemble of the source
experts (K forward passes, not one model).
"""
import statistics
import time
from dataclasses import dataclass, field

import torch

from .. import api
from ..methods import all_methods
from .checkpoints import trained_models
from .data import ANGLES, CANVAS, SPLIT_FRACTIONS, Split, rotated_domains, upright_train
from .evaluate import accuracy, ensemble_accuracy
from .model import TinyViT, ViTConfig
from .online import run_online
from .train import Schedule

ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0)


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    vit: ViTConfig = ViTConfig()
    base_schedule: Schedule = Schedule(epochs=40, lr=3e-3, weight_decay=0.05, warmup_steps=20)
    expert_schedule: Schedule = Schedule(epochs=10, lr=1e-3)
    alpha: float = 1.0
    alpha_grid: tuple = ALPHA_GRID           # () skips the alpha search
    angles: tuple = ANGLES
    device: str = "cpu"
    backend: str = "auto"                    # the merge backend; "reference" runs scoremerge.ref
    quick: bool = False
    online_batches: int | None = None        # the first N batches of every online stream

    def training_settings(self):
        """Everything that determines the trained weights (the cache key)."""
        return {"seed": self.seed, "vit": self.vit.as_dict(), "angles": list(self.angles),
                "base": self.base_schedule.as_dict(), "expert": self.expert_schedule.as_dict(),
                "canvas": CANVAS, "split": list(SPLIT_FRACTIONS)}

    def as_dict(self):
        return {**self.training_settings(), "alpha": self.alpha, "alpha_grid": list(self.alpha_grid),
                "device": self.device, "backend": self.backend, "quick": self.quick,
                "online_batches": self.online_batches}


def demo_config(*, seed=0, device="cpu", backend="auto", quick=False, tune_alpha=True):
    """The main job's settings; quick trains briefly, searches a short alpha grid and feeds each
    online stream's first 4 batches (for tests: the same pipeline end to end, weaker models)."""
    if quick:
        return DemoConfig(seed=seed, device=device, backend=backend, quick=True, online_batches=4,
                          base_schedule=Schedule(epochs=12, lr=3e-3, weight_decay=0.05,
                                                 warmup_steps=10),
                          expert_schedule=Schedule(epochs=4, lr=1e-3),
                          alpha_grid=(0.3, 0.6, 1.0, 1.3) if tune_alpha else ())
    return DemoConfig(seed=seed, device=device, backend=backend,
                      alpha_grid=ALPHA_GRID if tune_alpha else ())


@dataclass(frozen=True)
class Variant:
    """One row of merged models: a registered method with options."""
    label: str
    method: str
    options: dict = field(default_factory=dict)


def merge_variants():
    """Every registered method of task vectors with its default options, plus SCORE's diag
    variant (linear averages the models: with equal weights it is the mean, already a row)."""
    out = []
    for name, spec in all_methods().items():
        if spec.on_models:
            continue
        out.append(Variant(name, name))
        if name == "score":
            out.append(Variant("score:diag", "score", {"variant": "diag"}))
    return out


def run_experiment(config, cache_dir=None, retrain=False, log=print):
    """The whole benchmark; returns the results dict that report.py prints and writes."""
    start = time.perf_counter()
    device = torch.device(config.device)
    domains = rotated_domains(config.seed, config.angles)
    # Training always runs on the CPU: at this size a GPU is no faster, and CPU training is
    # deterministic, so a run with another device or backend merges the very same experts.
    base, experts, training = trained_models(config, upright_train(config.seed), domains,
                                             cache_dir, retrain, log)
    domains = [d.to(device) for d in domains]
    base = _to(base, device)
    experts = {a: _to(s, device) for a, s in experts.items()}
    model = TinyViT(config.vit).to(device)

    by_angle = {d.angle: d for d in domains}
    expert_matrix = {a: {d.angle: accuracy(model, experts[a], d.test) for d in domains}
                     for a in config.angles}
    reference = {"base": {}, "expert_in_domain": {}, "best_single_expert": {},
                 "best_single_expert_source": {}, "logit_ensemble": {}}
    variants = merge_variants()
    merged = {v.label: _row(v, config.alpha) for v in variants}
    tuned = {v.label: _row(v, None) for v in variants} if config.alpha_grid else {}

    for target in config.angles:
        test = by_angle[target].test
        sources = [a for a in config.angles if a != target]
        reference["base"][target] = accuracy(model, base, test)
        reference["expert_in_domain"][target] = expert_matrix[target][target]
        best = max(sources, key=lambda a: expert_matrix[a][target])
        reference["best_single_expert"][target] = expert_matrix[best][target]
        reference["best_single_expert_source"][target] = best
        reference["logit_ensemble"][target] = ensemble_accuracy(
            model, [experts[a] for a in sources], test)

        tvs = api.task_vectors(base, [experts[a] for a in sources])
        val = _concat([by_angle[a].val for a in sources])
        for v in variants:
            t0 = time.perf_counter()
            tau = api.merge_task_vectors(tvs, v.method, backend=config.backend, **v.options)
            _sync(device)
            merged[v.label]["merge_seconds"][target] = time.perf_counter() - t0
            merged[v.label]["accuracy"][target] = accuracy(model, _apply(base, tau, config.alpha),
                                                           test)
            if config.alpha_grid:
                alpha, val_acc = _best_alpha(model, base, tau, val, config.alpha_grid)
                row = tuned[v.label]
                row["alpha"][target] = alpha
                row["val_accuracy"][target] = val_acc
                row["accuracy"][target] = accuracy(model, _apply(base, tau, alpha), test)
        log(f"target {target:2d} deg: done ({len(sources)} source experts)")

    for rows in (merged, tuned):
        for row in rows.values():
            row["mean"] = statistics.fmean(row["accuracy"].values())
    online = run_online(config, experts, domains, log)
    return {"config": config.as_dict(), "domains": list(config.angles), "training": training,
            "expert_matrix": expert_matrix, "reference": reference, "merged": merged,
            "tuned_alpha": tuned, "online": online, "seconds": time.perf_counter() - start}


def _row(variant, alpha):
    row = {"method": variant.method, "options": dict(variant.options), "accuracy": {}}
    if alpha is None:
        row.update(alpha={}, val_accuracy={})
    else:
        row.update(alpha=alpha, merge_seconds={})
    return row


def _best_alpha(model, base, tau, val, grid):
    """The grid's alpha with the best source-validation accuracy (the smallest on ties)."""
    scores = [(accuracy(model, _apply(base, tau, a), val), -a) for a in sorted(grid)]
    acc, neg_alpha = max(scores)
    return -neg_alpha, acc


def _apply(base, tau, alpha):
    return {k: (b + alpha * tau[k].to(b.dtype)) if k in tau else b for k, b in base.items()}


def _concat(splits):
    return Split(torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits]))


def _to(state, device):
    return {k: v.to(device) for k, v in state.items()}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
