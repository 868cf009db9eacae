"""How OnlineMerger's default temperatures were chosen (for the paper's reading: raw entropies,
one group): the demo's online streams, on a training seed other than the reported one (seed 1;
the README then reported seed 0), for a grid of temp_enc x temp_head. Prints mean stream accuracy
per pair and writes bench/results/online_temperature_sweep.json. The strategies' options are
swept by bench/online_strategy_sweep.py.

    python bench/online_temperature_sweep.py [--seed 1]
"""
import argparse
import itertools
import json
import statistics

from scoremerge.demo.checkpoints import default_cache_dir, trained_models
from scoremerge.demo.data import rotated_domains, upright_train
from scoremerge.demo.experiment import demo_config
from scoremerge.demo.online import run_online

GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
PAPER = "entropy (paper)"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    config = demo_config(seed=args.seed)
    domains = rotated_domains(config.seed, config.angles)
    _, experts, _ = trained_models(config, upright_train(config.seed), domains,
                                   default_cache_dir(), log=lambda *a: None)
    rows = []
    for te, th in itertools.product(GRID, GRID):
        out = run_online(config, experts, domains, log=lambda *a: None,
                         variants={PAPER: {"strategy": "entropy", "calibration": None,
                                           "groups": 1, "temp_enc": te, "temp_head": th}})
        streams = out["streams"].values()
        held = statistics.fmean(r["accuracy"][PAPER] for r in streams if len(r["held_out"]) == 1)
        mixed = statistics.fmean(r["accuracy"][PAPER] for r in streams if len(r["held_out"]) == 2)
        rows.append({"temp_enc": te, "temp_head": th, "held_out": held, "mixed": mixed,
                     "all": out["mean"][PAPER],
                     "uniform_mean": out["mean"]["uniform_mean"]})
        print(f"temp_enc {te:5.2f} temp_head {th:5.2f}: held-out {100 * held:5.1f}  mixed "
              f"{100 * mixed:5.1f}  all {100 * rows[-1]['all']:5.1f}  (uniform mean "
              f"{100 * rows[-1]['uniform_mean']:5.1f})", flush=True)
    with open("bench/results/online_temperature_sweep.json", "w") as f:
        json.dump({"seed": args.seed, "command": f"python bench/online_temperature_sweep.py "
                   f"--seed {args.seed}", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
