"""Several seeds of the demo summarised: the mean and the spread (sample standard deviation over
the seeds) of every accuracy the tables print, so that no single seed's luck reads as a finding.

summarise(runs) returns (summary, spread). The summary has the shape of one run's results (what
report.py prints and plots), each accuracy replaced by its mean over the runs; spread mirrors it
with the standard deviations. A table's mean column is the mean and spread of the per-seed means
(not a mean of the per-target spreads).
"""
import statistics


def summarise(runs):
    """runs: results dicts of run_experiment, one per seed, same settings otherwise."""
    first = runs[0]
    summary = {"config": {**first["config"], "seed": [r["config"]["seed"] for r in runs]},
               "domains": first["domains"], "reference": {}, "merged": {}, "tuned_alpha": {}}
    spread = {"reference": {}, "merged": {}, "tuned_alpha": {}}
    for key in first["reference"]:
        if key == "best_single_expert_source":
            continue
        values = [r["reference"][key] for r in runs]
        summary["reference"][key], sd = _stats(values)
        spread["reference"][key] = {"accuracy": sd,
                                    "mean": _sd([statistics.fmean(v.values()) for v in values])}
    for section in ("merged", "tuned_alpha"):
        for label, row in first[section].items():
            rows = [r[section][label] for r in runs]
            mean, sd = _stats([x["accuracy"] for x in rows])
            summary[section][label] = {"accuracy": mean, "mean": statistics.fmean(mean.values())}
            spread[section][label] = {"accuracy": sd, "mean": _sd([x["mean"] for x in rows])}
            if "merge_seconds" in row:
                summary[section][label]["merge_seconds"] = {
                    k: statistics.median(x["merge_seconds"][k] for x in rows)
                    for k in row["merge_seconds"]}
            if isinstance(row.get("alpha"), dict):
                summary[section][label]["alpha"] = {f"{k}/{r['config']['seed']}": x["alpha"][k]
                                                    for x, r in zip(rows, runs)
                                                    for k in x["alpha"]}
    summary["online"], spread["online"] = _online([r["online"] for r in runs])
    return summary, spread


def _online(onlines):
    first = onlines[0]
    streams, spread_streams = {}, {}
    for name, row in first["streams"].items():
        rows = [o["streams"][name] for o in onlines]
        acc, sd = _stats([x["accuracy"] for x in rows])
        streams[name] = {"held_out": row["held_out"], "sources": row["sources"], "n": row["n"],
                         "accuracy": acc,
                         "ms_per_batch": {k: statistics.median(x["ms_per_batch"][k] for x in rows)
                                          for k in row["ms_per_batch"]},
                         "merged_forwards": {k: statistics.fmean(x["merged_forwards"][k]
                                                                 for x in rows)
                                             for k in row["merged_forwards"]}}
        spread_streams[name] = sd
    mean, sd = _stats([o["mean"] for o in onlines])
    return ({"batch": first["batch"], "streams": streams, "mean": mean},
            {"streams": spread_streams, "mean": sd})


def _stats(dicts):
    """[{key: value}] -> ({key: mean}, {key: sample standard deviation}) over the list."""
    return ({k: statistics.fmean(d[k] for d in dicts) for k in dicts[0]},
            {k: _sd([d[k] for d in dicts]) for k in dicts[0]})


def _sd(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0
