"""`scoremerge example`: small synthetic checkpoints merged with every method, end to end
through files and `scoremerge merge`'s path (folders.merge_folders; a smoke test of the
checkpoint path; the main job is `scoremerge demo`).

The experts share a base; each adds a low-rank update of its own plus a shared one and noise,
so the merge methods disagree in ways the table shows: how well the merged task vector keeps
each expert's own update (cosine with it) and its size relative to one expert's.
"""
import time

import torch

from . import api
from .config import merge_settings
from .folders import merge_folders
from .io import load_state_dict, save_state_dict

SHAPES = {"block.attn.qkv.weight": (96, 32), "block.attn.qkv.bias": (96,),
          "block.attn.proj.weight": (32, 32), "block.norm.weight": (32,),
          "block.mlp.fc1.weight": (128, 32), "block.mlp.fc2.weight": (32, 128),
          "head.weight": (10, 32), "head.bias": (10,)}


def make_models(seed, n_experts=3, rank=4):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(*s, generator=g) * 0.1 for k, s in SHAPES.items()}
    experts = []
    shared = {k: _update(s, rank, g) for k, s in SHAPES.items()}
    for _ in range(n_experts):
        experts.append({k: base[k] + 0.5 * shared[k] + _update(s, rank, g)
                        + 0.01 * torch.randn(*s, generator=g) for k, s in SHAPES.items()})
    return base, experts


def _update(shape, rank, g):
    if len(shape) == 1:
        return torch.randn(*shape, generator=g) * 0.05
    return 0.05 * torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)


def run_example(out, seed):
    base, experts = make_models(seed)
    inputs = out / "inputs"
    paths = [inputs / "base"] + [inputs / f"expert{i}" for i in range(len(experts))]
    for path, model in zip(paths, [base] + experts):
        save_state_dict(model, path, overwrite=True, max_shard_size="40KB")  # sharded on purpose
    taus = api.task_vectors(base, experts)
    print(f"{len(experts)} experts of {sum(t.numel() for t in base.values())} parameters in "
          f"{inputs}\n")
    print(f"{'method':16s} {'seconds':>8s} {'cos(merged, expert) per expert':>32s} {'size':>6s}")
    for method in api.methods():
        target = out / "merged" / method
        start = time.perf_counter()
        merge_folders(merge_settings(base=str(paths[0]), experts=list(map(str, paths[1:])),
                                     method=method, out=str(target), overwrite=True,
                                     no_progress=True))
        seconds = time.perf_counter() - start
        merged = load_state_dict(target)
        tau = _flat({k: merged[k] - base[k] for k in base})
        cosines = [torch.nn.functional.cosine_similarity(tau, _flat(t), dim=0).item() for t in taus]
        size = tau.norm().item() / (sum(_flat(t).norm().item() for t in taus) / len(taus))
        print(f"{method:16s} {seconds:8.2f} {'  '.join(f'{c:6.3f}' for c in cosines):>32s} "
              f"{size:6.2f}")
    print(f"\nmerged checkpoints in {out / 'merged'}")
    return 0


def _flat(state):
    return torch.cat([v.reshape(-1).float() for v in state.values()])
