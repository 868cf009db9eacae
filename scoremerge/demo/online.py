"""The demo's online section: streams of unlabeled test batches from held-out rotations, merged
per batch by OnlineMerger's strategies, against single-model and multi-model baselines on the
same stream.

Streams: one per held-out rotation (its test split in shuffled batches; the other rotations'
experts merge), and mixed streams whose every batch draws half from each of two held-out
rotations (the other four experts merge) -- the heterogeneous shift under which a uniform mean
is expected to fail. Labels are used only to score. Calibration records (calibration.py) are made
from each expert's own rotation's validation split: never from a held-out rotation.
"""
import statistics
import time
from dataclasses import dataclass

import torch

from ..online import OnlineMerger, calibration_record
from ..online.calibration import REFERENCE_ENTROPY
from .data import Split
from .evaluate import accuracy_of_logits, ensemble_accuracy, logits
from .model import TinyViT

BATCH = 64
MIXED_PAIRS = ((0, 45), (15, 60), (30, 75))
RECORDS = "records"          # in a variant's options: the stream's source experts' records

# Row key -> OnlineMerger options. DEFAULT is OnlineMerger's defaults with the records given:
# the configuration bench/online_strategy_sweep.py chose on tuning seeds 10-14 (calibration
# records, at most 6 groups by coefficients, group prior 64, temp_enc 0.05; "chosen" in
# bench/results/online_strategy_sweep.json). The search row takes OnlineMerger's search defaults
# (chosen there too) and the DaWin baseline the temperature chosen there among its rows.
DEFAULT = "calibrated, grouped"
ONLINE_VARIANTS = {
    "entropy (paper)": {"strategy": "entropy", "calibration": None, "groups": 1},
    "stream-calibrated": {"strategy": "entropy", "calibration": "stream", "groups": 1},
    "calibrated": {"strategy": "entropy", "calibration": RECORDS, "groups": 1},
    "calibrated, grouped": {"calibration": RECORDS},
    "calibrated, search": {"strategy": "search", "calibration": RECORDS, "groups": 1},
    "DaWin per-sample": {"strategy": "entropy", "calibration": None, "groups": BATCH,
                         "group_prior": 0.0, "temp_enc": 0.05, "coupled": True}}
BASELINES = {"uniform_mean": "uniform mean", "single_expert_mean": "single expert, average",
             "best_single_expert": "best single expert **", "logit_ensemble": "logit ensemble ***"}
LABELS = {**{key: key + (" (default) +" if key == DEFAULT else "") for key in ONLINE_VARIANTS},
          **BASELINES}


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


def run_online(config, experts, domains, log=print, variants=None,
               reference_entropy=REFERENCE_ENTROPY):
    """Accuracy per method on every stream; experts: {angle: state dict} on config.device;
    variants: {row key: OnlineMerger options} (default ONLINE_VARIANTS); reference_entropy:
    the calibration records'."""
    variants = ONLINE_VARIANTS if variants is None else variants
    device = torch.device(config.device)
    backend = "torch" if config.backend == "reference" else config.backend
    model = TinyViT(config.vit).to(device)
    records = {d.angle: calibration_record(model, experts[d.angle], d.val.x,
                                          reference_entropy=reference_entropy) for d in domains}
    results = {"batch": BATCH, "records": records, "streams": {}}
    for stream in make_streams(domains, config.seed):
        stream = Stream(stream.name, stream.held_out, stream.batches[:config.online_batches])
        sources = [a for a in config.angles if a not in stream.held_out]
        states = [experts[a] for a in sources]
        whole = stream.everything()
        row = {"held_out": list(stream.held_out), "sources": sources, "n": len(whole),
               "accuracy": {}, "coefficients": {}, "ms_per_batch": {}, "merged_forwards": {}}
        for label, options in variants.items():
            options = {k: [records[a] for a in sources] if v == RECORDS else v
                       for k, v in options.items()}
            merger = OnlineMerger(TinyViT(config.vit).to(device), states, backend=backend,
                                  **options)
            acc, coeffs, seconds, forwards = _run_stream(merger, stream)
            row["accuracy"][label] = acc
            row["coefficients"][label] = coeffs
            row["ms_per_batch"][label] = 1000 * seconds / len(stream.batches)
            row["merged_forwards"][label] = forwards
        row["accuracy"] |= _baselines(model, states, sources, whole, row)
        results["streams"][stream.name] = row
        log(f"online stream {stream.name}: {len(stream.batches)} batches, "
            + ", ".join(f"{key} {100 * acc:.1f}%" for key, acc in row["accuracy"].items()
                        if key in (DEFAULT, "uniform_mean")))
    keys = list(variants) + list(BASELINES)
    results["mean"] = {key: statistics.fmean(r["accuracy"][key]
                                             for r in results["streams"].values())
                       for key in keys}
    return results


def _baselines(model, states, sources, whole, row):
    """The single-model and multi-model references on the whole stream; records each source
    expert's accuracy and the best one in `row`."""
    singles = {a: accuracy_of_logits(logits(model, s, whole.x), whole.y)
               for a, s in zip(sources, states)}
    best = max(singles, key=singles.get)
    row["single_expert"] = singles
    row["best_single_expert_source"] = best
    return {"uniform_mean": accuracy_of_logits(logits(model, _mean(states), whole.x), whole.y),
            "single_expert_mean": statistics.fmean(singles.values()),
            "best_single_expert": singles[best],
            "logit_ensemble": ensemble_accuracy(model, states, whole)}


def _run_stream(merger, stream):
    """(accuracy, mean coefficients per group, seconds, mean merged forwards per batch): the
    stream fed batch by batch."""
    correct, forwards, sums = 0, 0, {"encoder": 0.0, "head": 0.0}
    start = time.perf_counter()
    for batch in stream.batches:
        result = merger(batch.x)
        correct += (result.logits.argmax(dim=1) == batch.y).sum().item()
        forwards += result.merged_forwards
        for group in sums:
            sums[group] = sums[group] + result.coefficients[group].cpu()
    seconds = time.perf_counter() - start
    n, batches = sum(len(b) for b in stream.batches), len(stream.batches)
    return (correct / n, {g: (s / batches).tolist() for g, s in sums.items()}, seconds,
            forwards / batches)


def _mean(states):
    return {k: torch.stack([s[k].float() for s in states]).mean(dim=0).to(v.dtype)
            if v.is_floating_point() else v for k, v in states[0].items()}
