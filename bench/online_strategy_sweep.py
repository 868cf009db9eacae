"""How OnlineMerger's strategy defaults were chosen: the demo's online streams on tuning seeds
that the README never reports (10-14; it reports 0-4), for a grid of each strategy's options.
Prints, per configuration, the accuracy on every stream (mean over the seeds), its margin over
the uniform mean on the worst stream, and the mean over streams, and writes
bench/results/online_strategy_sweep.json (every row, the chosen ones, the command, the machine).

The rule that picks the defaults (choose()), aimed at the goal (at or above the uniform
mean on every stream, above the logit ensemble over all): among the configurations above the
logit ensemble on the tuning seeds, those whose worst-stream margin over the uniform mean is
within half a point of the best margin (closer is noise: a stream of 449 digits carries about
two points of binomial noise per seed, 0.9 for a five-seed mean), then the highest mean over
the streams. It picks OnlineMerger's default configuration among all rows but the DaWin
baseline's, the search's step and momentum among the search rows, and the DaWin baseline's
temperature among its rows (so the baseline is tuned as much as the strategies).

History, for the record: a first rule preferred one merged model per batch outright and picked a
configuration 0.1 points above the uniform mean on its worst stream, within noise of failing the
goal; it was replaced by the rule above before any reported seed was run. A run of a partial
grid (the grouped rows with priors 64-256) chose "records, G 6 by coefficients, prior 64, temp
0.05" by this rule; the whole grid was then run again (2026-12-02, before the five reported
seeds were run) and chose the same; the results file holds that run.

    python bench/online_strategy_sweep.py        # seeds 10-14, every part: 21 min on one core
"""
import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from scoremerge.demo.checkpoints import default_cache_dir, trained_models
from scoremerge.demo.data import rotated_domains, upright_train
from scoremerge.demo.experiment import demo_config
from scoremerge.demo.online import BATCH, RECORDS, run_online
from scoremerge.doctor.environment import cpu_name

TUNING_SEEDS = (10, 11, 12, 13, 14)
RESULTS = Path(__file__).parent / "results" / "online_strategy_sweep.json"
TOLERANCE = 0.005      # half a point of accuracy


def grid():
    """{part: [(name, reference entropy, OnlineMerger options)]}; every option not named is
    OnlineMerger's default at the time of the run (recorded with the rows)."""
    one = {"strategy": "entropy", "groups": 1}
    parts = {"calibration": [], "groups": [], "search": [], "dawin": []}
    for t in (0.02, 0.05, 0.1, 0.2):
        parts["calibration"] += [
            (f"raw, temp {t}", 0.3, {**one, "calibration": None, "temp_enc": t}),
            (f"stream, temp {t}", 0.3, {**one, "calibration": "stream", "temp_enc": t}),
            (f"records 0.3, temp {t}", 0.3, {**one, "calibration": RECORDS, "temp_enc": t})]
    for ref in (0.1, 0.2, 0.5, 0.8):
        parts["calibration"].append((f"records {ref}, temp 0.05", ref,
                                     {**one, "calibration": RECORDS, "temp_enc": 0.05}))
    grouped = [("entropy", G, prior, 0.05) for G in (2, 3, 4) for prior in (0, 16, 32, 64, 128)]
    grouped += [("coefficients", G, prior, 0.05) for G in (2, 3, 4, 6, 8)
                for prior in (0, 16, 32, 64, 128, 256)]
    grouped += [("coefficients", G, prior, 0.1) for G in (3, 4) for prior in (64, 128)]
    for by, G, prior, t in grouped:
        parts["groups"].append((f"records, G {G} by {by}, prior {prior}, temp {t}", 0.3,
                                {"strategy": "entropy", "calibration": RECORDS, "groups": G,
                                 "group_by": by, "group_prior": prior, "temp_enc": t}))
    for by in ("entropy", "coefficients"):
        parts["groups"].append((f"raw, G 3 by {by}, prior 128, temp 0.05", 0.3,
                                {"strategy": "entropy", "calibration": None, "groups": 3,
                                 "group_by": by, "group_prior": 128, "temp_enc": 0.05}))
    for step in (0.1, 0.3, 0.5):
        for momentum in (0.0, 0.5, 0.8):
            parts["search"].append((f"search step {step}, momentum {momentum}", 0.3,
                                    {"strategy": "search", "calibration": RECORDS, "groups": 1,
                                     "search_step": step, "momentum": momentum,
                                     "temp_enc": 0.05}))
    for t in (1.0, 0.2, 0.05):
        parts["dawin"].append((f"DaWin per-sample, temp {t}", 0.3,
                               {"strategy": "entropy", "calibration": None, "groups": BATCH,
                                "group_prior": 0.0, "temp_enc": t, "coupled": True}))
    return parts


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=list(TUNING_SEEDS))
    parser.add_argument("--part", nargs="+", default=list(grid()))
    args = parser.parse_args()
    if set(args.seeds) & set(range(5)):
        parser.error("seeds 0-4 are the reported ones: tune on others")
    # The demo's model is tiny: one thread is as fast, and on a shared machine far steadier
    # (two OpenMP threads fighting other processes for two cores ran 40x slower here).
    torch.set_num_threads(1)
    started = time.perf_counter()
    configs = [c for part in args.part for c in grid()[part]]
    per_seed = {name: [] for name, _, _ in configs}
    baselines = []
    for seed in args.seeds:
        config = demo_config(seed=seed)
        domains = rotated_domains(seed, config.angles)
        _, experts, _ = trained_models(config, upright_train(seed), domains, default_cache_dir(),
                                       log=lambda *a: None)
        for ref in sorted({r for _, r, _ in configs}):
            variants = {name: options for name, r, options in configs if r == ref}
            start = time.perf_counter()
            out = run_online(config, experts, domains, log=lambda *a: None, variants=variants,
                             reference_entropy=ref)
            print(f"seed {seed}, reference {ref}: {len(variants)} configurations in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
            for name in variants:
                per_seed[name].append({s: r["accuracy"][name] for s, r in out["streams"].items()})
            baselines.append({s: {k: r["accuracy"][k] for k in ("uniform_mean", "logit_ensemble",
                                                                 "best_single_expert")}
                              for s, r in out["streams"].items()})
    rows = summarise(configs, per_seed, baselines)
    chosen = {"default": choose(rows)}
    for part, among in (("search", lambda r: r["options"]["strategy"] == "search"),
                        ("dawin", lambda r: r["name"].startswith("DaWin"))):
        if part in args.part:
            chosen[part] = choose(rows, among)
    chosen = {part: {"name": row["name"], "options": row["options"],
                     "reference_entropy": row["reference_entropy"]}
              for part, row in chosen.items()}
    print("chosen:", {part: c["name"] for part, c in chosen.items()})
    RESULTS.write_text(json.dumps({
        "seeds": args.seeds, "parts": args.part, "chosen": chosen, "tolerance": TOLERANCE,
        "command": "python bench/online_strategy_sweep.py "
                   + " ".join(["--seeds", *map(str, args.seeds)] + ["--part", *args.part]),
        "environment": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "machine": f"CPU, {os.cpu_count()} cores "
                                   f"({cpu_name()})",
                        "torch": torch.__version__, "python": platform.python_version(),
                        "torch_threads": torch.get_num_threads(),
                        "seconds": round(time.perf_counter() - started)},
        "rows": rows}, indent=1) + "\n")


def summarise(configs, per_seed, baselines):
    """Mean over seeds per stream for every configuration and baseline; prints the table."""
    streams = list(baselines[0])

    def mean_of(runs, key=None):
        return {s: statistics.fmean(r[s] if key is None else r[s][key] for r in runs)
                for s in streams}
    n_refs = len(baselines) // len(per_seed[configs[0][0]])
    reference = {k: mean_of(baselines[::n_refs], k)
                 for k in ("uniform_mean", "logit_ensemble", "best_single_expert")}
    rows = [{"name": k, "options": None, "accuracy": v, "mean": statistics.fmean(v.values())}
            for k, v in reference.items()]
    for name, ref, options in configs:
        acc = mean_of(per_seed[name])
        rows.append({"name": name, "reference_entropy": ref, "options": options, "accuracy": acc,
                     "mean": statistics.fmean(acc.values()),
                     "worst_margin_over_uniform": min(acc[s] - reference["uniform_mean"][s]
                                                      for s in streams)})
    print(f"{'':40s}" + "".join(f"{s:>7s}" for s in streams) + "   mean  worst-vs-uniform")
    for row in rows:
        margin = row.get("worst_margin_over_uniform")
        print(f"{row['name']:40s}" + "".join(f"{100 * row['accuracy'][s]:7.1f}" for s in streams)
              + f"{100 * row['mean']:7.1f}" + ("" if margin is None else f"{100 * margin:+9.1f}"))
    return rows


def choose(rows, among=lambda row: not row["name"].startswith("DaWin")):
    """The best configuration row for which among(row) holds, by the module docstring's rule."""
    ensemble = next(r["mean"] for r in rows if r["name"] == "logit_ensemble")
    pool = [r for r in rows if r["options"] and among(r)]
    candidates = [r for r in pool if r["mean"] > ensemble] or pool
    best = max(r["worst_margin_over_uniform"] for r in candidates)
    near = [r for r in candidates if r["worst_margin_over_uniform"] >= best - TOLERANCE]
    return max(near, key=lambda r: r["mean"])


if __name__ == "__main__":
    main()
