"""Peak memory of a streaming merge: three experts and a base of a synthetic model of
SIZE GB (fp32, 4096 x 4096 matrices in 512 MB shards), merged by `scoremerge merge` under
/usr/bin/time -v; the peak resident set size against the size of one model, and the read rate.
Writes bench/results/streaming_memory_<method>.json.

    python bench/streaming_memory.py [--size-gb 4] [--method mean] [--work /tmp/scoremerge-mem]
"""
import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness import environment, RESULTS
from scoremerge.io import save_state_dict

SIDE = 4096                                   # 64 MB fp32 matrices, like a 7B layer's


def write_model(folder, size_gb, seed):
    """A sharded fp32 checkpoint of size_gb, written shard by shard (never whole in memory)."""
    if (folder / "model.safetensors.index.json").is_file():
        return
    n = int(size_gb * 2**30 // (SIDE * SIDE * 4))
    g = torch.Generator().manual_seed(seed)
    per_shard = 8
    index, tmp = {}, folder.with_name(folder.name + ".parts")
    for s in range(0, n, per_shard):
        part = {f"layers.{i}.weight": torch.randn(SIDE, SIDE, generator=g)
                for i in range(s, min(s + per_shard, n))}
        name = f"model-{s // per_shard + 1:05d}.safetensors"
        save_state_dict(part, tmp / name.removesuffix(".safetensors"), overwrite=True)
        (tmp / name.removesuffix(".safetensors") / "model.safetensors").rename(tmp / name)
        index |= {k: name for k in part}
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    for p in tmp.iterdir():
        if p.is_dir():
            p.rmdir()
    tmp.rename(folder)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--method", default="mean")
    parser.add_argument("--work", default="/tmp/scoremerge-mem")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    models = [work / f"model{i}" for i in range(4)]
    for i, m in enumerate(models):
        write_model(m, args.size_gb, seed=i)
    out = work / f"out-{args.method}"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "scoremerge", "merge", "--base",
           str(models[0]), "--experts", *map(str, models[1:]), "--method", args.method,
           "--out", str(out), "--overwrite", "--no-progress", "--max-shard-size", "1GB"]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if run.returncode:
        sys.exit(run.stdout + run.stderr)
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    model_bytes = sum(p.stat().st_size for p in models[0].glob("*.safetensors"))
    row = {"method": args.method, "model_GB": model_bytes / 1e9, "inputs_GB": 4 * model_bytes / 1e9,
           "peak_rss_GB": peak_kb * 1024 / 1e9, "peak_over_model": peak_kb * 1024 / model_bytes,
           "seconds": seconds, "read_GBps": 4 * model_bytes / 1e9 / seconds,
           "scoremerge_says": run.stdout.strip().splitlines()[-1]}
    print(json.dumps(row, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"streaming_memory_{args.method}.json").write_text(
        json.dumps({**environment("cpu"), "command": " ".join(["python"] + sys.argv),
                    "rows": [row]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
