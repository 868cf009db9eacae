"""The per-block table shared by the Triton and CUDA mixing kernels.

One kernel block (Triton program, CUDA thread block) per run of at most `block` elements of one
group: blocks never straddle groups, so a block reads its group's coefficients once and no
per-element group index exists anywhere. Imports torch only (cuda.py must import on a machine
without triton)."""
import functools

import torch


@functools.lru_cache(maxsize=64)
def plan(bounds, device, block):
    """(block_group int32, block_start int64, block_end int64) on `device` for bounds (a tuple of
    G + 1 offsets): one entry per `block`-long run of one group. Built once per (bounds, device,
    block) and cached: an online merger mixes the same arena layout every batch."""
    groups, starts, ends = [], [], []
    for g in range(len(bounds) - 1):
        for s in range(bounds[g], bounds[g + 1], block):
            groups.append(g)
            starts.append(s)
            ends.append(min(s + block, bounds[g + 1]))
    return (torch.tensor(groups, dtype=torch.int32, device=device),
            torch.tensor(starts, dtype=torch.int64, device=device),
            torch.tensor(ends, dtype=torch.int64, device=device))
