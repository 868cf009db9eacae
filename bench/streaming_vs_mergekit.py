"""Merges of the same mergekit YAML by `mergekit-yaml` (mergekit 0.1.5, pinned) and by
`scoremerge merge --config` (which reads mergekit's schema with mergekit's conventions), on
generated Llama-shaped checkpoints (bench/llama_checkpoints.py): linear, task arithmetic and TIES
with per-model weights (and densities), each under /usr/bin/time -v: wall time, input GB/s, peak
resident memory, and how far apart the results are (0.0: the same tensors). Before each run
the page cache is synced (no dirty output of the other run left to write back) and warmed by a
read of every input (both tools then read from memory).
Writes bench/results/streaming_vs_mergekit.json (or --out's name).

    python bench/streaming_vs_mergekit.py [--layers 4 --hidden 2048 --vocab 32000] [--work DIR]
                                          [--repeat 3] [--max-memory SIZE]
                                          [--out streaming_vs_mergekit]
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from harness import environment, RESULTS
from llama_checkpoints import write_llama_family
from scoremerge.io import load_state_dict

WEIGHTS = [1.0, 0.7, 0.5]
# method -> (shared parameters, per-model parameters beyond the weight)
CASES = {
    "linear": ({}, [{}, {}, {}]),
    "task_arithmetic": ({"lambda": 0.8}, [{}, {}, {}]),
    "ties": ({"normalize": True}, [{"density": 0.5}, {"density": 0.4}, {"density": 0.3}]),
}


def mergekit_config(method, folders, path):
    """A mergekit YAML for `method` over base folders[0] and experts folders[1:] (linear: the
    experts only, as a linear config has no base)."""
    shared, per_model = CASES[method]
    config = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(f), "parameters": {"weight": w, **extra}}
                         for f, w, extra in zip(folders[1:], WEIGHTS, per_model)]}
    if method != "linear":
        config["base_model"] = str(folders[0])
    if shared:
        config["parameters"] = shared
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def timed(cmd):
    """(seconds, peak RSS in bytes, the merge's own seconds where the command reports them) of
    a command run under /usr/bin/time -v."""
    start = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    merge = re.search(r"merged .* in ([\d.]+) s, streaming", run.stdout + run.stderr)
    return seconds, peak * 1024, float(merge.group(1)) if merge else None


def warm(folders):
    """Read every input file once so both tools find it in the page cache, and write back
    what is dirty (the other tool's output) so neither run pays for the other's writes."""
    os.sync()
    for f in folders:
        for p in sorted(f.glob("*.safetensors")):
            with open(p, "rb") as fh:
                while fh.read(1 << 26):
                    pass


def difference(a, b):
    """Largest relative Frobenius difference over keys between two merged folders."""
    x, y = load_state_dict(a), load_state_dict(b)
    assert set(x) == set(y), "the two merges hold different keys"
    return max(((x[k].double() - y[k].double()).norm() / y[k].double().norm().clamp_min(1e-30))
               .item() for k in y)


def run_case(method, folders, work, repeat, max_memory=None):
    """Both tools on the same config, `repeat` times each, alternating; the median run of each
    (wall time and its peak RSS) is reported, with every time measured."""
    read = folders[1:] if method == "linear" else folders
    input_bytes = sum(p.stat().st_size for f in read for p in f.glob("*.safetensors"))
    out_mk, out_sm = work / f"mergekit-{method}", work / f"scoremerge-{method}"
    config = mergekit_config(method, folders, work / f"{method}.yml")
    runs = {"mergekit": [], "scoremerge": []}
    for _ in range(repeat):
        shutil.rmtree(out_mk, ignore_errors=True)          # mergekit-yaml has no --overwrite
        warm(folders)
        runs["mergekit"].append(timed([str(Path(sys.executable).parent / "mergekit-yaml"),
                                       str(config), str(out_mk), "--allow-crimes"]))
        shutil.rmtree(out_sm, ignore_errors=True)          # outside the timing, as mergekit's
        warm(folders)
        budget = ["--max-memory", max_memory] if max_memory else []
        runs["scoremerge"].append(timed([sys.executable, "-m", "scoremerge", "merge", "--config",
                                         str(config), "--out", str(out_sm), "--no-progress",
                                         *budget]))
    (mk_s, mk_rss, _), (sm_s, sm_rss, sm_merge_s) = (sorted(runs[t])[(repeat - 1) // 2]
                                                     for t in runs)
    return {"method": method, "config": yaml.safe_load(config.read_text()),
            "scoremerge_max_memory": max_memory,
            "inputs_GB": input_bytes / 1e9,
            "runs_s": {t: [r[0] for r in rs] for t, rs in runs.items()},
            # scoremerge's own report of the merge, without the interpreter's start and imports
            "scoremerge_merge_s": sm_merge_s, "scoremerge_merge_GBps": input_bytes / 1e9 / sm_merge_s,
            "mergekit_s": mk_s, "scoremerge_s": sm_s, "speedup": mk_s / sm_s,
            "mergekit_GBps": input_bytes / 1e9 / mk_s, "scoremerge_GBps": input_bytes / 1e9 / sm_s,
            "mergekit_peak_rss_GB": mk_rss / 1e9, "scoremerge_peak_rss_GB": sm_rss / 1e9,
            "max_relative_difference": difference(out_sm, out_mk)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--methods", nargs="+", default=list(CASES))
    p.add_argument("--work", default="/tmp/scoremerge-vs-mergekit")
    p.add_argument("--repeat", type=int, default=3, help="runs of each tool; the median counts")
    p.add_argument("--max-memory", help="scoremerge's --max-memory (default: its own default)")
    p.add_argument("--out", default="streaming_vs_mergekit", help="bench/results/<out>.json")
    a = p.parse_args()
    work = Path(a.work)
    folders = write_llama_family(work / "models", layers=a.layers, hidden=a.hidden,
                                 intermediate=a.intermediate, vocab=a.vocab, experts=3)
    load_before = os.getloadavg()[0]
    rows = [run_case(m, folders, work, a.repeat, a.max_memory) for m in a.methods]
    for r in rows:
        print(json.dumps(r))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.out}.json").write_text(json.dumps(
        {**environment("cpu"), "command": " ".join(["python"] + sys.argv),
         "model": {"layers": a.layers, "hidden": a.hidden, "intermediate": a.intermediate,
                   "vocab": a.vocab, "experts": 3, "dtype": "float32"},
         "load_average": {"before": load_before, "after": os.getloadavg()[0]},
         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
