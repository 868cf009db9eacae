"""Times of the same merges by whichever scoremerge is importable: run it once per source tree,
alternating, to tell whether a change (a refactor, say) slowed anything down.

    git worktree add /tmp/before <old commit>
    for i in 1 2; do PYTHONPATH=/tmp/before python bench/tree_timing.py; python bench/tree_timing.py; done

Prints one JSON line: the scoremerge file imported and, per merge, the minimum of --rounds runs
in seconds. "svd": merge_task_vectors on one ViT-B/16 block, T = 3, float32 (the SVD methods).
"streaming": merge_checkpoints of a base and three experts written once under --work (48
1024x1024 float32 keys and an 8000x2048 embedding, 1.07 GB of input), by entry-wise methods.
Only ratios between trees run back to back mean anything on a shared machine.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scoremerge  # noqa: E402
from scoremerge.io import save_state_dict  # noqa: E402
from scoremerge.streaming import merge_checkpoints  # noqa: E402
from workloads import VIT_B_BLOCK, task_vectors  # noqa: E402


def best_of(rounds, fn):
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(best, 3)


def svd_times(methods, rounds):
    tvs = [{k: v.float() for k, v in tv.items()} for tv in task_vectors(VIT_B_BLOCK, T=3)]
    return {m: best_of(rounds, lambda m=m: scoremerge.merge_task_vectors(tvs, m))
            for m in methods}


def streaming_files(root):
    """A base and three experts as safetensors folders under root, written the first time."""
    if (root / "e2").exists():
        return root
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.{n}": 0.02 * torch.randn(1024, 1024, generator=g)
            for i in range(12) for n in ("q", "k", "v", "o")}
    base["embed"] = 0.02 * torch.randn(8000, 2048, generator=g)
    for name in ("base", "e0", "e1", "e2"):
        model = base if name == "base" else \
            {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_state_dict(model, root / name, overwrite=True, max_shard_size="200MB")
    return root


def streaming_times(methods, rounds, root):
    root = streaming_files(root)
    experts = [root / f"e{i}" for i in range(3)]
    return {m: best_of(rounds, lambda m=m: merge_checkpoints(
        root / "base", experts, root / "out", m, overwrite=True, progress=False))
        for m in methods}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--svd", nargs="*", default=["score", "tsv", "iso_c", "iso_cts"])
    parser.add_argument("--streaming", nargs="*", default=["task_arithmetic", "mean"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", default="/tmp/scoremerge-tree-timing")
    args = parser.parse_args()
    print(json.dumps({"scoremerge": scoremerge.__file__,
                      "svd": svd_times(args.svd, args.rounds),
                      "streaming": streaming_times(args.streaming, args.rounds,
                                                   Path(args.work))}))


if __name__ == "__main__":
    main()
