"""merge_checkpoints: a merge of safetensors checkpoints of any size in bounded memory.

Nothing is loaded whole. The headers are read first and everything is checked that can be
(keys, shapes, dtypes, truncated files, the index against the shards); then the keys are merged
in batches of same-shape keys under a byte budget, in the base's order, so each shard file is
read front to back. A reader thread fetches the next batch while the current one is merged, and
a writer thread puts each merged tensor straight at its place in its output shard (the shard's
header is written first, from the plan), so memory holds a few batches, never a model or a shard.

The output is built in a hidden folder beside `out`, under the output lock (io.access), and
renamed into place at the end. A completed shard is recorded there with its SHA-256;
`resume=True` re-verifies the recorded shards and merges only the rest, with the same inputs
(io.checkpoint's fingerprint) and settings. Bad input found mid-way (NaN in a tensor, a merged
value that overflows the output dtype, an input rewritten or replaced while it was read)
removes the partial output; an interruption leaves it for `resume`.
"""
import functools
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import api
from .distributed import World
from .errors import MergeInputError, shown
from .io.access import (check_output, check_own_partial, check_replaceable, is_weight_file,
                        output_lock)
from .io.atomic import replace_folder, write_file_atomically
from .io.checkpoint import Checkpoint, layout_format
from .io.safetensors_format import read_header
from .io.shard_writer import ShardWriter
from .io.write import copy_side_files, output_metadata, parse_size, plan_shards, write_index
from .validate import check_device, check_dtype, check_models, check_same_keys, exclude_patterns

PROGRESS_NAME = "scoremerge-progress-{rank}.json"        # one per rank: no shared writes
PROGRESS_GLOB = "scoremerge-progress-*.json"
CPU_BATCH_BYTES = 256 * 2**20      # input bytes per batch on the CPU at most (all models together)
CPU_MEMORY_FRACTION = 0.25         # of the machine's memory, when --max-memory is not given
CPU_MEMORY_FACTOR = 4              # bytes per input byte: the batch read ahead, the batch merged
                                   # with its float32 task vectors and output, the one written
GPU_BUDGET_FRACTION = 0.5          # of free GPU memory, when --max-gpu-memory is not given
WORKSPACE_FACTOR = 8               # GPU bytes per input byte: f32 copies, SVD workspaces, outputs


def merge_checkpoints(base, experts, out, method="score", *, weights=None, alpha=1.0, exclude=(),
                      backend="auto", device=None, dtype=None, max_gpu_memory=None,
                      max_memory=None, max_shard_size="5GB", overwrite=False, resume=False,
                      progress=True, metadata=None, side_files=(), allow_nonfinite=False,
                      **options):
    """Merge safetensors checkpoints (files or Hugging Face folders, sharded or not) into `out`,
    streaming: base + alpha * merged task vectors, as api.merge computes it, key batch by key
    batch. Returns a dict of what was done (seconds, bytes read, shards written and skipped).
    Under torchrun (WORLD_SIZE > 1) the ranks take the output shards in turn, each writing its
    own, one GPU per rank; rank 0 holds the output lock, writes the index, renames the folder.

    max_gpu_memory: GPU memory budget for a batch, with its workspace (bytes or "20GB"; default:
    half the free memory). max_memory: the same on the CPU (default: a quarter of the machine's
    memory; batches hold at most 256 MiB of inputs). An entrywise method (mean, task arithmetic,
    MagMax) splits a key larger than a batch into spans of its entries, so the budget holds
    whatever the key sizes; other methods need a key whole, and a key larger than the budget is
    a batch of its own. max_shard_size: output shard size. resume: finish an interrupted merge
    of the same inputs and settings.
    side_files: paths, or (name, path) pairs from io.access.side_files, copied beside the
    weights. Methods must merge keys independently: TIES with scope="global" ranks entries over
    the whole model and is refused here (use scope="tensor", or the in-memory api.merge).
    """
    start = time.perf_counter()
    experts = list(experts)
    spec, opts = api.checked_method(method, options, len(experts))
    weights = api.checked_weights(weights, len(experts), spec, opts)
    if spec.name == "ties" and opts.get("scope") == "global":
        raise MergeInputError("ties with scope=global ranks entries over the whole model, which a "
                              "streaming merge never holds; use --option scope=tensor, or merge "
                              "in memory")
    exclude = exclude_patterns(exclude)
    alpha = api.checked_alpha(alpha)
    world = World()
    device = check_device(device)
    if world.size > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)      # one GPU per rank
    with ExitStack() as opened:
        models = [opened.enter_context(_open_safetensors(p)) for p in (base, *experts)]
        names = [f"base {base}"] + [f"expert {e}" for e in experts]
        _check_layouts(models, names)
        out = Path(out)
        check_output(out, [base, *experts, *(f for m in models for f in m.files),
                           *(item[1] if isinstance(item, tuple) else item for item in side_files)])
        shards = plan_shards(((k, i.nbytes) for k, i in models[0].infos.items()),
                             parse_size(max_shard_size))
        batches = _plan_batches(models, shards, _batch_bytes(device, max_gpu_memory, max_memory),
                                split=spec.entrywise)
        meta = output_metadata({
            "method": spec.name, "options": json.dumps(opts, sort_keys=True), "alpha": alpha,
            **({} if weights is None else {"weights": json.dumps(weights)}),
            "exclude": json.dumps(list(exclude)), "base": base,
            "experts": json.dumps([str(e) for e in experts]), **(metadata or {})}, shards,
            side_files)
        plan = _Plan(out, models, names, shards, meta,
                     _fingerprint(models, meta, backend, device, dtype, shards), world)

        def merge(tensors):
            check_models(tensors, names, values=not spec.entrywise)
            return api.merge_checked(tensors[0], tensors[1:], spec, opts, weights=weights,
                                     alpha=alpha,
                                     exclude=exclude, backend=backend, device=device,
                                     dtype=dtype, allow_nonfinite=allow_nonfinite, names=names)

        with ExitStack() as locked:
            _prepare(plan, locked, overwrite, resume)
            skipped = _merge_my_shards(plan, batches, merge, device, progress, spec.name)
            _finish_all(plan, side_files, overwrite)
    return plan.stats | {"seconds": time.perf_counter() - start, "out": str(out),
                         "shards_written": len(shards) - skipped, "shards_skipped": skipped,
                         "rank": world.rank, "ranks": world.size}


class _Plan:
    """What every stage of one streaming merge reads: the output, the open inputs, the shard
    plan, the metadata, the resume fingerprint, the ranks; and the statistics it gathers."""

    def __init__(self, out, models, names, shards, meta, settings, world):
        self.out, self.models, self.names, self.shards = out, models, names, shards
        self.meta, self.settings, self.world = meta, settings, world
        self.partial = out.parent / f".{out.name}.scoremerge-partial"
        self.done = {}
        self.stats = {"bytes_read": 0, "keys": 0, "read_s": 0.0, "compute_s": 0.0,
                      "write_s": 0.0}


def _prepare(plan, locked, overwrite, resume):
    """Rank 0 takes the output lock (held until `locked` closes), checks the output, and makes
    or reopens the build folder; then every rank learns the shards a resumed merge reuses.
    A failure on rank 0 reaches every rank, so none waits for the others forever."""
    error = None
    if plan.world.rank == 0:
        try:
            locked.enter_context(output_lock(plan.out))
            check_replaceable(plan.out, overwrite)
            partial = plan.partial
            if os.path.lexists(partial):
                check_own_partial(partial)
                if not resume:
                    shutil.rmtree(partial)
            partial.mkdir(parents=True, exist_ok=True)
        except BaseException as e:
            error = e
    if plan.world.max(1 if error else 0):
        raise error or MergeInputError("rank 0 could not start this merge; see its error")
    plan.done = _verified_shards(plan.partial, plan.settings) if resume else {}
    _write_progress(plan.partial, plan.settings, plan.done, plan.world.rank)


def _merge_my_shards(plan, batches, merge, device, progress, method):
    """Merge this rank's shards (ranks take whole output shards in turn, so each writes only
    its own files), check that no input changed meanwhile, and agree with the other ranks on
    how it went: bad input (2) removes the build folder; anything else (1) leaves the
    completed shards for resume. Returns how many shards were reused."""
    world, reused = plan.world, len(plan.done)
    mine = {name for i, name in enumerate(plan.shards) if i % world.size == world.rank}
    todo = [b for b in batches if b.shard in mine and b.shard not in plan.done]
    bar = tqdm(total=sum(b.nbytes for b in todo), unit="B", unit_scale=True,
               desc=f"merge ({method})", disable=not progress)
    writers, error = {}, None
    try:
        _run(todo, plan, writers, bar, merge, device)
        for model in plan.models:
            model.check_unchanged()
    except BaseException as e:
        for w in writers.values():
            w.abort()                          # completed shards stay, for resume
        error = e
    finally:
        bar.close()
    outcome = world.max(2 if isinstance(error, MergeInputError) else 1 if error else 0)
    if outcome == 2 and world.rank == 0:
        shutil.rmtree(plan.partial, ignore_errors=True)
    if outcome:
        world.barrier()
        raise error or MergeInputError("another rank of this merge failed; see its error")
    return reused


def _finish_all(plan, side_files, overwrite):
    """Rank 0 finishes the folder; its error reaches the other ranks at the barrier."""
    error = None
    if plan.world.rank == 0:
        try:
            _finish(plan, side_files, overwrite)
        except BaseException as e:
            error = e
    plan.world.barrier()
    if error is not None:
        raise error


def _open_safetensors(path):
    checkpoint = Checkpoint(path)
    if checkpoint.format != "safetensors":
        checkpoint.close()
        raise MergeInputError(f"{path}: streaming reads safetensors checkpoints: expected a "
                              ".safetensors file, model.safetensors or "
                              "model.safetensors.index.json")
    return checkpoint


class _Batch:
    """Same-shape keys of one output shard, read and merged together; or, with span (start,
    stop), the entries [start, stop) of a single key too large for one batch."""

    def __init__(self, shard, keys, nbytes, span=None):
        self.shard, self.keys, self.nbytes, self.span = shard, keys, nbytes, span


def _check_layouts(models, names):
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


def _batch_bytes(device, max_gpu_memory, max_memory):
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


def _plan_batches(models, shards, budget, split):
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
                    batches.append(_Batch(name, current, size))
                    current, size = [], 0
                current.append(key)
                size += nbytes
            if current:
                batches.append(_Batch(name, current, size))
    return batches


def _spans(shard, key, models, budget):
    per_entry = sum(m.infos[key].dtype.itemsize for m in models)
    n = models[0].infos[key].nbytes // models[0].infos[key].dtype.itemsize
    step = max(1, budget // per_entry)
    return [_Batch(shard, [key], (min(n, start + step) - start) * per_entry,
                   span=(start, min(n, start + step))) for start in range(0, n, step)]


def _run(batches, plan, writers, bar, merge, device):
    """The pipeline: read batch i+1 (and on a GPU copy it over) while batch i merges; write
    batch i while i+1 merges."""
    models, stats = plan.models, plan.stats
    remaining = {}                          # batches of each shard not yet written
    for batch in batches:
        remaining[batch.shard] = remaining.get(batch.shard, 0) + 1
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        fetch = reader.submit(_read, batches[0], models, stats, device) if batches else None
        pending = None
        for i, batch in enumerate(batches):
            tensors = _arrived(*fetch.result(), device)
            fetch = reader.submit(_read, batches[i + 1], models, stats, device) \
                if i + 1 < len(batches) else None
            t0 = time.perf_counter()
            merged = merge(tensors)
            if device.type == "cuda":
                torch.cuda.synchronize(device)           # so compute_s is the GPU's time
            stats["compute_s"] += time.perf_counter() - t0
            if pending is not None:
                pending.result()                          # at most one batch waits to be written
            if batch.shard not in writers:
                layout = {k: (models[0].infos[k].dtype, models[0].infos[k].shape)
                          for k in plan.shards[batch.shard]}
                writers[batch.shard] = ShardWriter(plan.partial / batch.shard, layout, plan.meta)
            pending = writer.submit(_write, plan, writers, batch, merged, remaining)
            bar.update(batch.nbytes)
            stats["keys"] += len(batch.keys) if not batch.span or not batch.span[0] else 0
            bar.set_postfix(keys=stats["keys"])
        if pending is not None:
            pending.result()


def _read(batch, models, stats, device):
    """The batch's tensors of every model, and on a GPU an event marking their arrival there:
    read into memory, then copied from pinned (page-locked) memory on a side stream, so the
    copy runs while the previous batch computes."""
    t0 = time.perf_counter()
    span = batch.span or (None, None)
    out = [{key: m.read(key, *span) for key in batch.keys} for m in models]
    event = None
    if device.type == "cuda":
        with torch.cuda.stream(_copy_stream(device)):
            out = [{k: v.pin_memory().to(device, non_blocking=True) for k, v in d.items()}
                   for d in out]
            event = torch.cuda.Event()
            event.record()
    stats["read_s"] += time.perf_counter() - t0
    stats["bytes_read"] += batch.nbytes
    return out, event


def _arrived(tensors, event, device):
    """The tensors, usable on the compute stream: it waits for their copy, and the caching
    allocator learns they are in use there (they were allocated on the copy stream)."""
    if event is not None:
        compute = torch.cuda.current_stream(device)
        compute.wait_event(event)
        for d in tensors:
            for t in d.values():
                t.record_stream(compute)
    return tensors


@functools.cache
def _copy_stream(device):
    return torch.cuda.Stream(device)


def _write(plan, writers, batch, merged, remaining):
    t0 = time.perf_counter()
    w = writers[batch.shard]
    for key in batch.keys:
        w.put(key, merged[key], start=batch.span[0] if batch.span else None)
    remaining[batch.shard] -= 1
    if remaining[batch.shard] == 0:
        w.finish()
        del writers[batch.shard]
        plan.done[batch.shard] = _sha256(plan.partial / batch.shard)
        _write_progress(plan.partial, plan.settings, plan.done, plan.world.rank)
    plan.stats["write_s"] += time.perf_counter() - t0


def _fingerprint(models, meta, backend, device, dtype, shards):
    """What must match for `resume` to reuse shards: the inputs (io.checkpoint's fingerprint),
    the settings, the plan."""
    blob = json.dumps({"inputs": [m.fingerprint() for m in models], "meta": meta,
                       "backend": backend, "device": device.type, "dtype": str(dtype),
                       "plan": shards}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _verified_shards(partial, settings):
    """{shard: sha256} recorded in an interrupted merge's progress files (one per rank) whose
    files still hash to it; empty when there are none. Other inputs or settings are an error."""
    recorded = {}
    for path in sorted(partial.glob(PROGRESS_GLOB)):
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            continue
        if not isinstance(progress, dict) or progress.get("settings") != settings:
            raise MergeInputError(f"{partial}: an interrupted merge with other inputs or "
                                  "settings; rerun without --resume to start over")
        done = progress.get("done")
        if isinstance(done, dict):
            recorded |= {k: v for k, v in done.items() if isinstance(v, str)}
    return {name: digest for name, digest in recorded.items()
            if is_weight_file(name) and (partial / name).is_file()
            and _sha256(partial / name) == digest}


def _write_progress(partial, settings, done, rank):
    write_file_atomically(partial / PROGRESS_NAME.format(rank=rank), lambda p: Path(p).write_text(
        json.dumps({"settings": settings, "done": done}, indent=1)))


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _finish(plan, side_files, overwrite):
    partial, shards = plan.partial, plan.shards
    write_index(partial, shards, sum(i.nbytes for i in plan.models[0].infos.values()), plan.meta)
    copy_side_files(partial, side_files)
    for name in shards:                   # a last look: every shard is there and readable
        with open(partial / name, "rb") as f:
            read_header(f, os.fstat(f.fileno()).st_size, partial / name)
    for path in partial.glob(PROGRESS_GLOB):
        path.unlink()
    check_replaceable(plan.out, overwrite)        # in case it appeared while merging
    replace_folder(partial, plan.out)


def streaming_refusal(settings):
    """Why `scoremerge merge` with these settings (config.MergeSettings) cannot stream, or None:
    every input must be a safetensors checkpoint, and the method must merge keys one by one."""
    for path in (settings.base, *settings.experts):
        if layout_format(path) != "safetensors":
            return f"{path} is not a safetensors checkpoint (a .safetensors file, or a folder " \
                   "with model.safetensors or model.safetensors.index.json)"
    if settings.method == "ties" and settings.option.get("scope") == "global":
        return "ties with scope=global ranks entries over the whole model"
    return None
