"""The streaming merge's plan: the inputs opened and checked from their headers alone, the memory
budget, and the batches (same-shape keys of one output shard, or spans of one large key)."""
import os

import torch

from ..errors import MergeInputError, shown
from ..io.checkpoint import Checkpoint
from ..io.write import parse_size
from ..validate import check_dtype, check_same_keys

CPU_BATCH_BYTES = 256 * 2**20      # input bytes per batch on the CPU at most (all models together)
CPU_MEMORY_FRACTION = 0.25         # of the machine's memory, when --max-memory is not given
CPU_MEMORY_FACTOR = 4              # bytes per input byte: the batch read ahead, the batch merged
                                   # with its float32 task vectors and output, the one written
GPU_BUDGET_FRACTION = 0.5          # of free GPU memory, when --max-gpu-memory is not given
WORKSPACE_FACTOR = 8               # GPU bytes per input byte: f32 copies, SVD workspaces, outputs


class Plan:
    """What every stage of one streaming merge reads: the output, the open inputs, the shard
    plan, the metadata, the resume fingerprint, the ranks; and the statistics it gathers."""

    def __init__(self, out, models, names, shards, meta, settings, world):
        self.out, self.models, self.names, self.shards = out, models, names, shards
        self.meta, self.settings, self.world = meta, settings, world
        self.partial = out.parent / f".{out.name}.scoremerge-partial"
        self.done = {}
        self.stats = {"bytes_read": 0, "keys": 0, "read_s": 0.0, "compute_s": 0.0,
                      "write_s": 0.0, "ranking_s": 0.0}


class Batch:
    """Same-shape keys of one output shard, read and merged together; or, with span (start,
    stop), the entries [start, stop) of a single key too large for one batch."""

    def __init__(self, shard, keys, nbytes, span=None):
        self.shard, self.keys, self.nbytes, self.span = shard, keys, nbytes, span


def open_safetensors(path):
    checkpoint = Checkpoint(path)
    if checkpoint.format != "safetensors":
        checkpoint.close()
        raise MergeInputError(f"{path}: streaming reads safetensors checkpoints: expected a "
                              ".safetensors file, model.safetensors or "
                              "model.safetensors.index.json")
    return checkpoint


def check_layouts(models, names):
    """Keys, shapes and dtypes from the headers alone, before anything is read or written."""
    check_same_keys([m.infos for m in models], names)
    first = models[0].infos
    for model, name in zip(models, names):
        for key, info in first.items():
            other = model.infos[key]
            check_dtype(key, other.dtype, name)
            if other.shape != info.shape:
                raise MergeInputError(f"shape mismatch at key {shown(key)}: {names[0]} has "
                                      f"{info.shape}, {name} has {other.shape}")
            if other.dtype.is_floating_point != info.dtype.is_floating_point:
                raise MergeInputError(f"key {shown(key)} is {info.dtype} in {names[0]} and "
                                      f"{other.dtype} in {name}")


def batch_bytes(device, max_gpu_memory, max_memory):
    """Input bytes (all models together) per batch, from the memory budget."""
    if device.type != "cuda":
        if max_memory is None:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return min(CPU_BATCH_BYTES, int(total * CPU_MEMORY_FRACTION) // CPU_MEMORY_FACTOR)
        return max(1, min(CPU_BATCH_BYTES, parse_size(max_memory) // CPU_MEMORY_FACTOR))
    if max_gpu_memory is not None:
        return max(1, parse_size(max_gpu_memory) // WORKSPACE_FACTOR)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * GPU_BUDGET_FRACTION) // WORKSPACE_FACTOR)


def plan_batches(models, shards, budget, split):
    """Within each output shard, same-shape keys together up to `budget` input bytes. A key
    larger than the budget is cut into spans of its entries when `split` (the method is
    entrywise), else it is a batch of its own."""
    batches = []
    for name, keys in shards.items():
        by_shape = {}
        for key in keys:
            by_shape.setdefault(models[0].infos[key].shape, []).append(key)
        for group in by_shape.values():
            current, size = [], 0
            for key in group:
                nbytes = sum(m.infos[key].nbytes for m in models)
                if split and nbytes > budget:
                    batches += _spans(name, key, models, budget)
                    continue
                if current and size + nbytes > budget:
                    batches.append(Batch(name, current, size))
                    current, size = [], 0
                current.append(key)
                size += nbytes
            if current:
                batches.append(Batch(name, current, size))
    return batches


def _spans(shard, key, models, budget):
    per_entry = sum(m.infos[key].dtype.itemsize for m in models)
    n = models[0].infos[key].nbytes // models[0].infos[key].dtype.itemsize
    step = max(1, budget // per_entry)
    return [Batch(shard, [key], (min(n, start + step) - start) * per_entry,
                   span=(start, min(n, start + step))) for start in range(0, n, step)]
