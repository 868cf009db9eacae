"""FusionBench 0.2.33's algorithm classes against scoremerge's drop-ins on a ViT-B/16 model pool.

    python bench/fusion_bench_vit_b16.py [--tasks 8] [--layers 12] [--rounds 2] [--device cpu]
        [--threads N] [--methods tsv iso_c iso_cts ties task_arithmetic magmax] [--out NAME]

The pretrained model is a randomly initialised CLIPVisionModel of ViT-B/16's shape (12 layers,
width 768, 85.8M parameters, the model FusionBench's CLIP pools load); each of T experts adds a
low-rank-plus-noise update to every matrix (decaying spectra, as fine-tuning updates have) and
noise elsewhere. For each method both classes get the arguments of FusionBench's own config
(plus `fusion_bench_compat: true` for TIES) and run on the same pool in the same process, in
alternating order; each run gets a fresh copy of the pretrained model (both classes write into
it), made outside the timing. Reported: seconds per run (minimum over rounds), their ratio, and
the agreement of the merged models, as the largest relative Frobenius error of a merged update
(merged - pretrained) and the number of entries that differ at all. The result is written to
bench/results/<NAME>.json with the command, machine, versions, date and machine load.

On a CPU shared with other jobs, torch's multi-threaded LAPACK calls (FusionBench's per-key
SVDs) slow down many times over while their threads wait for each other, and scoremerge's
one-thread-per-worker calls do not: measure on a quiet machine, or with --threads 1 (both
single-threaded), which that contention does not skew.
"""
import argparse
import contextlib
import copy
import importlib.metadata
import json
import os
import resource
import sys
import time

import lightning as L
import torch
from fusion_bench import BaseModelPool
from fusion_bench import method as fb
from transformers import CLIPVisionConfig, CLIPVisionModel

import scoremerge
import scoremerge.integrations.fusion_bench as sm

from harness import RESULTS, environment, machine_state

METHODS = {    # FusionBench's config arguments, and scoremerge's extra ones
    "tsv": ("TaskSingularVectorMerging", {"alpha": 1, "exclude_keys": None}, {}),
    "iso_c": ("IsotropicMergingInCommonSubspace", {"scaling_factor": 1.0}, {}),
    "iso_cts": ("IsotropicMergingInCommonAndTaskSubspace",
                {"scaling_factor": 1.0, "common_space_fraction": 0.8}, {}),
    "ties": ("TiesMergingAlgorithm", {"scaling_factor": 0.3, "threshold": 20, "remove_keys": [],
                                      "merge_func": "sum"}, {"fusion_bench_compat": True}),
    "task_arithmetic": ("TaskArithmeticAlgorithm", {"scaling_factor": 0.3}, {}),
    "magmax": ("MagMaxAlgorithm", {"scaling_factor": 0.5}, {}),
}


def vit_b16(layers, seed):
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=layers,
                              num_attention_heads=12, image_size=224, patch_size=16)
    return CLIPVisionModel(config).eval()


def make_pool(tasks, layers, seed=0):
    """{"_pretrained_": model, "task_t": model}: each expert adds, per matrix, a rank min/8
    product plus 10% noise (scale 1e-3), and 1e-3 noise to every other tensor."""
    base = vit_b16(layers, seed)
    g = torch.Generator().manual_seed(seed + 1)
    models = {"_pretrained_": base}
    for t in range(tasks):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for p in expert.parameters():
                if p.ndim == 2:
                    r = max(1, min(p.shape) // 8)
                    low_rank = (torch.randn(p.shape[0], r, generator=g)
                                @ torch.randn(r, p.shape[1], generator=g)) / r
                    update = low_rank + 0.1 * torch.randn(p.shape, generator=g)
                else:
                    update = torch.randn(p.shape, generator=g)
                p.add_(1e-3 * update)
        models[f"task_{t}"] = expert
    return models


def run_once(algorithm, models, device):
    """Seconds for algorithm.run on a pool whose pretrained model is a fresh copy, and the
    merged state dict."""
    pool = BaseModelPool({name: copy.deepcopy(m) if name == "_pretrained_" else m
                          for name, m in models.items()})
    algorithm._fabric_instance = L.Fabric(accelerator=device, devices=1)
    # FusionBench prints a line per key
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        start = time.perf_counter()
        merged = algorithm.run(pool)
        seconds = time.perf_counter() - start
    return seconds, {k: v.detach().clone() for k, v in merged.state_dict().items()}


def agreement(ours, theirs, base):
    """(largest relative error of a merged update, entries that differ, entries)."""
    worst, differ, total = 0.0, 0, 0
    for key, want in theirs.items():
        got = ours[key]
        update = (want.double() - base[key].double()).norm().item()
        worst = max(worst, (got.double() - want.double()).norm().item() / max(update, 1e-300))
        differ += int((got != want).sum())
        total += want.numel()
    return worst, differ, total


def compare(name, models, rounds, device):
    """One row: both classes on the same pool, alternating which goes first each round."""
    cls, args, extra = METHODS[name]
    builders = {"fusion_bench": lambda: getattr(fb, cls)(**args),
                "scoremerge": lambda: getattr(sm, cls)(**args, **extra)}
    best, merged = {}, {}
    for r in range(rounds):
        for impl in (list(builders) if r % 2 == 0 else list(builders)[::-1]):
            seconds, merged[impl] = run_once(builders[impl](), models, device)
            best[impl] = min(best.get(impl, float("inf")), seconds)
    base = models["_pretrained_"].state_dict()
    worst, differ, total = agreement(merged["scoremerge"], merged["fusion_bench"], base)
    row = {"method": name, "fusion_bench_class": f"fusion_bench.method.{cls}",
           "arguments": {**args, **extra}, "fusion_bench_s": best["fusion_bench"],
           "scoremerge_s": best["scoremerge"], "ratio": best["fusion_bench"] / best["scoremerge"],
           "max_rel_err_of_update": worst, "entries_differing": differ, "entries": total}
    print(f"{name:16s} FusionBench {row['fusion_bench_s']:8.2f} s  scoremerge "
          f"{row['scoremerge_s']:8.2f} s  ratio {row['ratio']:5.2f}x  update rel err "
          f"{worst:.1e}  entries differing {differ}/{total}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default=None,
                        help="results name (default fusion_bench_vit_b16_<device>)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    before = machine_state()
    models = make_pool(args.tasks, args.layers)
    params = sum(p.numel() for p in models["_pretrained_"].parameters())
    print(f"ViT-B/16 pool: {args.layers} layers, {params / 1e6:.1f}M parameters, T = {args.tasks}, "
          f"{args.rounds} round(s), {args.device}", flush=True)
    path = RESULTS / f"{args.out or f'fusion_bench_vit_b16_{args.device}'}.json"
    rows = []
    for name in args.methods:       # written after every method: a long run keeps what it did
        rows.append(compare(name, models, args.rounds, args.device))
        write(path, args, params, before, rows)
    print(f"written {path}")


def write(path, args, params, before, rows):
    env = environment(args.device)
    env["versions"].update({"fusion_bench": importlib.metadata.version("fusion-bench"),
                            "scoremerge": scoremerge.__version__})
    result = {**env, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "tasks": args.tasks, "layers": args.layers,
              "parameters": params, "dtype": "float32", "rounds": args.rounds,
              "peak_rss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
              "machine_before": before, "machine_after": machine_state(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
