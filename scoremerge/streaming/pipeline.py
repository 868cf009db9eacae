"""The streaming merge's pipeline: this rank's batches read, merged and written, the three
overlapped (a reader thread fetches the next batch, and on a GPU copies it over on a side stream,
while the current one merges; a writer thread puts each merged tensor at its place in its output
shard), and the ranks' agreement on how it went."""
import functools
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from ..errors import MergeInputError
from ..io.shard_writer import ShardWriter
from .resume import completed, write_progress


def merge_my_shards(plan, batches, merge, device, progress, method):
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


def _run(batches, plan, writers, bar, merge, device):
    """The pipeline: read batch i+1 (and on a GPU copy it over) while batch i merges; write
    batch i while i+1 merges."""
    models, stats = plan.models, plan.stats
    remaining = {}                          # batches of each shard not yet written
    for batch in batches:
        remaining[batch.shard] = remaining.get(batch.shard, 0) + 1
    buffers = InputBuffers(batches, models)
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        fetch = reader.submit(_read, batches[0], 0, buffers, models, stats, device) \
            if batches else None
        pending = None
        for i, batch in enumerate(batches):
            tensors = _arrived(*fetch.result(), device)
            fetch = reader.submit(_read, batches[i + 1], i + 1, buffers, models, stats, device) \
                if i + 1 < len(batches) else None
            t0 = time.perf_counter()
            merged = buffers.unshared(merge(batch, tensors))
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


class InputBuffers:
    """Two arenas that batches are read into in turn: batch i + 1 fills one while batch i, in
    the other, merges. Why: memory allocated fresh for every batch is faulted in page by page
    as the read fills it (the kernel zeroes each page first), and reading into reused memory
    ran 2.2x faster (1.8 -> 4.0 GB/s from the page cache, 256 MiB reads, 2-core machine). The
    arenas are sized for the largest batch, the memory the fresh tensors took at their peak.
    Batch i's arena is refilled by batch i + 2, after batch i has merged; the merged tensors
    must not be views of it, which unshared() makes sure of before they go to the writer."""
    ALIGN = 64

    def __init__(self, batches, models):
        self.models = models
        # a checkpoint named twice is read once: alias[m], the first model with m's files
        self.alias = [next(i for i in range(m + 1) if i == m or models[i].same_files(model))
                      for m, model in enumerate(models)]
        size = max((self._layout(b)[1] for b in batches), default=0)
        self.arenas = [torch.empty(size, dtype=torch.uint8) for _ in range(min(2, len(batches)))]

    def _layout(self, batch):
        """([(model index, key, dtype, shape, offset)], bytes) of the batch in an arena."""
        places, offset = [], 0
        for m, model in enumerate(self.models):
            if self.alias[m] != m:
                continue
            for key in batch.keys:
                info = model.infos[key]
                shape = info.shape if batch.span is None else (batch.span[1] - batch.span[0],)
                places.append((m, key, info.dtype, shape, offset))
                nbytes = torch.Size(shape).numel() * info.dtype.itemsize
                offset += -(-nbytes // self.ALIGN) * self.ALIGN
        return places, offset

    def tensors(self, batch, i):
        """[{key: an empty tensor} per model] for batch number i, views into its arena."""
        arena = self.arenas[i % len(self.arenas)]
        out = [{} for _ in self.models]
        for m, key, dtype, shape, offset in self._layout(batch)[0]:
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            out[m][key] = arena[offset:offset + nbytes].view(dtype).view(shape)
        return [out[first] for first in self.alias]

    def unshared(self, merged):
        """The merged tensors, each copied if it shares memory with an arena (no method returns
        such a view today; this keeps a future one from being overwritten while it is written)."""
        bounds = [(a.data_ptr(), a.data_ptr() + a.numel()) for a in self.arenas]
        return {key: t.clone() if any(lo <= t.data_ptr() < hi for lo, hi in bounds) else t
                for key, t in merged.items()}


def _read(batch, i, buffers, models, stats, device):
    """Batch number i's tensors of every model, and on a GPU an event marking their arrival
    there: read into its arena (InputBuffers), then copied from pinned (page-locked) memory on a
    side stream, so the copy runs while the previous batch computes."""
    t0 = time.perf_counter()
    span = batch.span or (None, None)
    out, nbytes = buffers.tensors(batch, i), 0
    for m, (model, tensors) in enumerate(zip(models, out)):
        if buffers.alias[m] != m:
            continue                                    # the same tensors as model alias[m]
        for key, tensor in tensors.items():
            model.read(key, *span, out=tensor)
            nbytes += tensor.numel() * tensor.element_size()
    event = None
    if device.type == "cuda":
        with torch.cuda.stream(_copy_stream(device)):
            moved = {}
            for m, d in enumerate(out):
                if buffers.alias[m] == m:
                    moved[m] = {k: v.pin_memory().to(device, non_blocking=True)
                                for k, v in d.items()}
            out = [moved[first] for first in buffers.alias]
            event = torch.cuda.Event()
            event.record()
    stats["read_s"] += time.perf_counter() - t0
    stats["bytes_read"] += nbytes
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
        plan.done[batch.shard] = completed(plan.partial / batch.shard)
        write_progress(plan.partial, plan.settings, plan.done, plan.world.rank)
    plan.stats["write_s"] += time.perf_counter() - t0
