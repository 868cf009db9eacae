"""The demo's online section: streams of unlabeled test batches from held-out rotations, merged
per batch by OnlineMerger, against single-model and multi-model baselines on the same stream.

Streams: one per held-out rotation (its test split in shuffled batches; the other rotations'
experts merge), and mixed streams whose every batch draws half from each of two held-out
rotations (the other four experts merge) -- the heterogeneous shift under which a uniform mean
is expected to fail. Labels are used only to score.
"""
import statistics
import time
from dataclasses import dataclass

import torch

from ..online import OnlineMerger
from .data import Split
from .evaluate import accuracy_of_logits, ensemble_accuracy, logits
from .model import TinyViT

BATCH = 64
MIXED_PAIRS = ((0, 45), (15, 60), (30, 75))

# Row label -> OnlineMerger options (merger defaults otherwise).
ONLINE_VARIANTS = {"online entropy": {}, "online, coupled head": {"coupled": True}}
LABELS = {"online entropy": "online entropy (ours) +", "online, coupled head": "online, coupled head",
          "uniform_mean": "uniform mean", "single_expert_mean": "single expert, average",
          "best_single_expert": "best single expert **", "logit_ensemble": "logit ensemble ***"}


@dataclass(frozen=True)
class Stream:
    name: str
    held_out: tuple
    batches: tuple          # of Split, in arrival order

    def everything(self):
        return Split(torch.cat([b.x for b in self.batches]), torch.cat([b.y for b in self.batches]))


def make_streams(domains, seed, batch=BATCH, pairs=MIXED_PAIRS):
    """Held-out streams for every domain, then mixed streams for the pairs present."""
    by_angle = {d.angle: d.test for d in domains}
    g = torch.Generator().manual_seed(seed + 1000)
    out = []
    for angle, test in by_angle.items():
        order = torch.randperm(len(test), generator=g)
        out.append(Stream(f"{angle}", (angle,), _batches(test, order, batch)))
    for a, b in (p for p in pairs if set(p) <= set(by_angle)):
        n = min(len(by_angle[a]), len(by_angle[b]))
        ia, ib = (torch.randperm(len(by_angle[x]), generator=g)[:n] for x in (a, b))
        half = batch // 2
        parts = []
        for lo in range(0, n, half):
            sa, sb = by_angle[a], by_angle[b]
            parts.append(Split(torch.cat([sa.x[ia[lo:lo + half]], sb.x[ib[lo:lo + half]]]),
                               torch.cat([sa.y[ia[lo:lo + half]], sb.y[ib[lo:lo + half]]])))
        out.append(Stream(f"{a}+{b}", (a, b), tuple(parts)))
    return out


def _batches(split, order, batch):
    return tuple(Split(split.x[order[i:i + batch]], split.y[order[i:i + batch]])
                 for i in range(0, len(order), batch))


def run_online(config, experts, domains, log=print, merger_options=None):
    """Accuracy per method on every stream; experts: {angle: state dict} on config.device."""
    device = torch.device(config.device)
    backend = "torch" if config.backend == "reference" else config.backend
    model = TinyViT(config.vit).to(device)
    results = {"batch": BATCH, "streams": {}}
    for stream in make_streams(domains, config.seed):
        sources = [a for a in config.angles if a not in stream.held_out]
        states = [experts[a] for a in sources]
        whole = stream.everything()
        row = {"held_out": list(stream.held_out), "sources": sources, "n": len(whole),
               "accuracy": {}, "coefficients": {}, "ms_per_batch": {}}
        for label, options in ONLINE_VARIANTS.items():
            merger = OnlineMerger(TinyViT(config.vit).to(device), states, backend=backend,
                                  **{**(merger_options or {}), **options})
            acc, coeffs, seconds = _run_stream(merger, stream)
            row["accuracy"][label] = acc
            row["coefficients"][label] = coeffs
            row["ms_per_batch"][label] = 1000 * seconds / len(stream.batches)
        singles = {a: accuracy_of_logits(logits(model, s, whole.x), whole.y)
                   for a, s in zip(sources, states)}
        best = max(singles, key=singles.get)
        row["accuracy"] |= {
            "uniform_mean": accuracy_of_logits(logits(model, _mean(states), whole.x), whole.y),
            "single_expert_mean": statistics.fmean(singles.values()),
            "best_single_expert": singles[best],
            "logit_ensemble": ensemble_accuracy(model, states, whole)}
        row["single_expert"] = singles
        row["best_single_expert_source"] = best
        results["streams"][stream.name] = row
        log(f"online stream {stream.name}: {len(stream.batches)} batches, "
            f"online {100 * row['accuracy']['online entropy']:.1f}% vs uniform mean "
            f"{100 * row['accuracy']['uniform_mean']:.1f}%")
    results["mean"] = {label: statistics.fmean(r["accuracy"][label]
                                               for r in results["streams"].values())
                       for label in LABELS}
    return results


def _run_stream(merger, stream):
    """(accuracy, mean coefficients per group, seconds): the stream fed batch by batch."""
    correct, sums = 0, {"encoder": 0.0, "head": 0.0}
    start = time.perf_counter()
    for batch in stream.batches:
        result = merger(batch.x)
        correct += (result.logits.argmax(dim=1) == batch.y).sum().item()
        for group in sums:
            sums[group] = sums[group] + result.coefficients[group].cpu()
    seconds = time.perf_counter() - start
    n = sum(len(b) for b in stream.batches)
    return correct / n, {g: (s / len(stream.batches)).tolist() for g, s in sums.items()}, seconds


def _mean(states):
    return {k: torch.stack([s[k].float() for s in states]).mean(dim=0).to(v.dtype)
            if v.is_floating_point() else v for k, v in states[0].items()}
