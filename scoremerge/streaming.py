"""merge_checkpoints: a merge of safetensors checkpoints of any size in bounded memory.

Nothing is loaded whole. The headers are read first and everything is checked that can be
(keys, shapes, dtypes, truncated files, the index against the shards); then the keys are merged
in batches of same-shape keys under a byte budget, in the base's order, so each shard file is
read front to back. A reader thread fetches the next batch while the current one is merged, and
a writer thread puts each merged tensor straight at its place in its output shard (the shard's
header is written first, from the plan), so memory holds a few batches, never a model or a shard.

The output is built in a hidden folder beside `out` and renamed into place at the end. A
completed shard is recorded there with its SHA-256; `resume=True` re-verifies the recorded
shards and merges only the rest, with the same settings. Bad input found mid-way (NaN in a
tensor) removes the partial output; an interruption leaves it for `resume`.
"""
import functools
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import api
from ._version import __version__
from .distributed import World
from .errors import MergeInputError
from .io.lazy import LazyCheckpoint, read_header
from .io.shard_writer import ShardWriter
from .io.write import INDEX_NAME, check_writable, parse_size, replace_folder, shard_names
from .validate import check_models, check_same_keys, exclude_patterns

PROGRESS_NAME = "scoremerge-progress-{rank}.json"        # one per rank: no shared writes
PROGRESS_GLOB = "scoremerge-progress-*.json"
CPU_BATCH_BYTES = 256 * 2**20      # input bytes per batch on the CPU (all models together)
GPU_BUDGET_FRACTION = 0.5          # of free GPU memory, when --max-gpu-memory is not given
WORKSPACE_FACTOR = 8               # GPU bytes per input byte: f32 copies, SVD workspaces, outputs


def merge_checkpoints(base, experts, out, method="score", *, alpha=1.0, exclude=(),
                      backend="auto", device=None, dtype=None, max_gpu_memory=None,
                      max_shard_size="5GB", overwrite=False, resume=False, progress=True,
                      metadata=None, side_files=(), **options):
    """Merge safetensors checkpoints (files or Hugging Face folders, sharded or not) into `out`,
    streaming: base + alpha * merged task vectors, as api.merge computes it, key batch by key
    batch. Returns a dict of what was done (seconds, bytes read, shards written and skipped).
    Under torchrun (WORLD_SIZE > 1) the ranks take the output shards in turn, each writing its
    own, one GPU per rank; rank 0 writes the index and renames the folder.

    max_gpu_memory: GPU memory budget for a batch, with its workspace (bytes or "20GB"; default:
    half the free memory). On the CPU batches hold 256 MiB of inputs. max_shard_size: output
    shard size. resume: finish an interrupted merge of the same inputs and settings.
    Methods must merge keys independently: TIES with scope="global" ranks entries over the whole
    model and is refused here (use scope="tensor", or the in-memory api.merge).
    """
    start = time.perf_counter()
    experts = list(experts)
    if not experts:
        raise MergeInputError("no experts given: merging needs at least one fine-tuned model")
    spec, opts = api._method_and_options(method, options, len(experts))
    if spec.name == "ties" and opts.get("scope") == "global":
        raise MergeInputError("ties with scope=global ranks entries over the whole model, which a "
                              "streaming merge never holds; use --option scope=tensor, or merge "
                              "in memory")
    exclude = exclude_patterns(exclude)
    out = Path(out)
    partial = out.parent / f".{out.name}.scoremerge-partial"
    if not (resume and partial.is_dir()):
        check_writable(out, overwrite)
    world = World()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if world.size > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)      # one GPU per rank
    models = [LazyCheckpoint(p) for p in (base, *experts)]
    names = [f"base {base}"] + [f"expert {e}" for e in experts]
    _check_layouts(models, names)
    shards = _plan_shards(models[0], parse_size(max_shard_size))
    batches = _plan_batches(models, shards, _batch_bytes(device, max_gpu_memory))
    meta = {"format": "pt", "scoremerge_version": __version__, "method": spec.name,
            "options": json.dumps(opts, sort_keys=True), "alpha": str(alpha),
            "exclude": json.dumps(list(exclude)), "base": str(base),
            "experts": json.dumps([str(e) for e in experts]), **(metadata or {})}
    settings = _fingerprint(models, meta, backend, device, dtype, shards)

    if world.rank == 0:
        if not resume and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
    world.barrier()
    done = _verified_shards(partial, settings) if resume else {}
    _write_progress(partial, settings, done, world.rank)

    # Ranks take whole output shards in turn, so each writes only its own files.
    mine = {name for i, name in enumerate(shards) if i % world.size == world.rank}
    skipped = len(done)
    todo = [b for b in batches if b.shard in mine and b.shard not in done]
    bar = tqdm(total=sum(b.nbytes for b in todo), unit="B", unit_scale=True,
               desc=f"merge ({spec.name})", disable=not progress)
    stats = {"bytes_read": 0, "keys": 0, "read_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
    writers, error = {}, None
    try:
        _run(todo, models, shards, writers, partial, meta, bar, stats, done, settings,
             world.rank, lambda tensors: _merge_batch(tensors, names, spec.name, alpha=alpha,
                                                      exclude=exclude, backend=backend,
                                                      device=device, dtype=dtype, **opts),
             device)
    except BaseException as e:
        for w in writers.values():
            w.abort()                          # completed shards stay, for resume
        error = e
    finally:
        bar.close()
    # Every rank gets here, failed or not, and learns whether any failed, and how: bad input
    # (2) leaves nothing behind; anything else (1) leaves the completed shards for resume.
    outcome = world.max(2 if isinstance(error, MergeInputError) else 1 if error else 0)
    if outcome == 2 and world.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    if outcome:
        world.barrier()
        raise error or MergeInputError("another rank of this merge failed; see its error")
    finish_error = None
    if world.rank == 0:
        try:
            _finish(partial, out, shards, models[0], meta, side_files, overwrite)
        except BaseException as e:          # the other ranks must not wait at the barrier
            finish_error = e
    world.barrier()
    if finish_error is not None:
        raise finish_error
    stats |= {"seconds": time.perf_counter() - start, "shards_written": len(shards) - skipped,
              "shards_skipped": skipped, "out": str(out), "rank": world.rank,
              "ranks": world.size}
    return stats


class _Batch:
    """Same-shape keys of one output shard, read and merged together."""

    def __init__(self, shard, keys, nbytes):
        self.shard, self.keys, self.nbytes = shard, keys, nbytes


def _check_layouts(models, names):
    check_same_keys([m.infos for m in models], names)
    first = models[0].infos
    for model, name in zip(models[1:], names[1:]):
        for key, info in first.items():
            other = model.infos[key]
            if other.shape != info.shape:
                raise MergeInputError(f"shape mismatch at key {key!r}: {names[0]} has "
                                      f"{info.shape}, {name} has {other.shape}")
            if other.dtype.is_floating_point != info.dtype.is_floating_point:
                raise MergeInputError(f"key {key!r} is {info.dtype} in {names[0]} and "
                                      f"{other.dtype} in {name}")


def _plan_shards(base, limit):
    """Output shards: the base's keys in its order, cut where a shard would pass `limit`."""
    shards, size = [[]], 0
    for key, info in base.infos.items():
        if shards[-1] and size + info.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += info.nbytes
    names = shard_names(len(shards))
    return {name: keys for name, keys in zip(names, shards)}


def _batch_bytes(device, max_gpu_memory):
    if device.type != "cuda":
        return CPU_BATCH_BYTES
    if max_gpu_memory is not None:
        return max(1, parse_size(max_gpu_memory) // WORKSPACE_FACTOR)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * GPU_BUDGET_FRACTION) // WORKSPACE_FACTOR)


def _plan_batches(models, shards, budget):
    """Within each output shard, same-shape keys together up to `budget` input bytes (a single
    key larger than the budget is a batch of its own)."""
    batches = []
    for name, keys in shards.items():
        by_shape = {}
        for key in keys:
            by_shape.setdefault(models[0].infos[key].shape, []).append(key)
        for group in by_shape.values():
            current, size = [], 0
            for key in group:
                nbytes = sum(m.infos[key].nbytes for m in models)
                if current and size + nbytes > budget:
                    batches.append(_Batch(name, current, size))
                    current, size = [], 0
                current.append(key)
                size += nbytes
            batches.append(_Batch(name, current, size))
    return batches


def _run(batches, models, shards, writers, partial, meta, bar, stats, done, settings, rank,
         merge, device):
    """The pipeline: read batch i+1 (and on a GPU copy it over) while batch i merges; write
    batch i while i+1 merges."""
    remaining = {name: len(keys) for name, keys in shards.items() if name not in done}
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
                          for k in shards[batch.shard]}
                writers[batch.shard] = ShardWriter(partial / batch.shard, layout, meta)
            pending = writer.submit(_write, writers, batch, merged, remaining, partial, done,
                                    settings, rank, stats)
            bar.update(batch.nbytes)
            stats["keys"] += len(batch.keys)
            bar.set_postfix(keys=stats["keys"])
        if pending is not None:
            pending.result()


def _merge_batch(tensors, names, method, **kw):
    """api.merge of one batch; its checks name the checkpoints (NaN in which key of which)."""
    check_models(tensors, names)
    return api.merge(tensors[0], tensors[1:], method, **kw)


def _read(batch, models, stats, device):
    """The batch's tensors of every model, and on a GPU an event marking their arrival there:
    read into memory, then copied from pinned (page-locked) memory on a side stream, so the
    copy runs while the previous batch computes."""
    t0 = time.perf_counter()
    out = [{key: m.read(key) for key in batch.keys} for m in models]
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


def _write(writers, batch, merged, remaining, partial, done, settings, rank, stats):
    t0 = time.perf_counter()
    w = writers[batch.shard]
    for key in batch.keys:
        w.put(key, merged[key])
    remaining[batch.shard] -= len(batch.keys)
    if remaining[batch.shard] == 0:
        w.finish()
        del writers[batch.shard]
        done[batch.shard] = _sha256(partial / batch.shard)
        _write_progress(partial, settings, done, rank)
    stats["write_s"] += time.perf_counter() - t0


def _fingerprint(models, meta, backend, device, dtype, shards):
    """What must match for `resume` to reuse shards: inputs (path, size, mtime), settings, plan."""
    inputs = [[str(p), st.st_size, st.st_mtime_ns]
              for m in models for p in m.shards for st in [os.stat(p)]]
    blob = json.dumps({"inputs": inputs, "meta": meta, "backend": backend,
                       "device": device.type, "dtype": str(dtype),
                       "plan": {n: k for n, k in shards.items()}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _verified_shards(partial, settings):
    """{shard: sha256} recorded in an interrupted merge's progress files (one per rank) whose
    files still hash to it; empty when there are none. Other inputs or settings are an error."""
    recorded = {}
    for path in sorted(partial.glob(PROGRESS_GLOB)):
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if progress.get("settings") != settings:
            raise MergeInputError(f"{partial}: an interrupted merge with other inputs or "
                                  "settings; rerun without --resume to start over")
        recorded |= progress.get("done", {})
    return {name: digest for name, digest in recorded.items()
            if (partial / name).is_file() and _sha256(partial / name) == digest}


def _write_progress(partial, settings, done, rank):
    path = partial / PROGRESS_NAME.format(rank=rank)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"settings": settings, "done": done}, indent=1))
    os.replace(tmp, path)


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _finish(partial, out, shards, base, meta, side_files, replace):
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for i in base.infos.values()), **meta},
                 "weight_map": {k: name for name, keys in shards.items() for k in keys}}
        (partial / INDEX_NAME).write_text(json.dumps(index, indent=2))
    for f in side_files:
        shutil.copy2(f, partial / Path(f).name)
    for name in shards:                   # a last look: every shard is there and readable
        read_header(partial / name)
    for path in partial.glob(PROGRESS_GLOB):
        path.unlink()
    if out.exists() and not replace and any(out.iterdir()):
        raise MergeInputError(f"{out}: appeared while merging; the result is in {partial}")
    replace_folder(partial, out)


def streaming_refusal(settings):
    """Why `scoremerge merge` with these settings (config.MergeSettings) cannot stream, or None:
    every input must be a safetensors checkpoint, and the method must merge keys one by one."""
    for path in (settings.base, *settings.experts):
        if not _is_safetensors(Path(path)):
            return f"{path} is not a safetensors checkpoint (a .safetensors file, or a folder " \
                   "with model.safetensors or model.safetensors.index.json)"
    if settings.method == "ties" and settings.option.get("scope") == "global":
        return "ties with scope=global ranks entries over the whole model"
    return None


def _is_safetensors(path):
    if path.is_file():
        return path.suffix == ".safetensors"
    return (path / "model.safetensors").is_file() or (path / INDEX_NAME).is_file()
