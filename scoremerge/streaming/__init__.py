"""merge_checkpoints: a merge of safetensors checkpoints of any size in bounded memory.

Nothing is loaded whole. The headers are read first and everything is checked that can be
(keys, shapes, dtypes, truncated files, the index against the shards); then the keys are merged
in batches of same-shape keys under a byte budget, in the base's order, so each shard file is
read front to back (plan.py). A reader thread fetches the next batch into reused memory while
the current one is merged, and a writer thread puts each merged tensor straight at its place in
its output shard (the shard's header is written first, from the plan), so memory holds a few
batches, never a model or a shard (pipeline.py).

The output is built in a hidden folder beside `out`, under the output lock (io.access), and
renamed into place at the end. A completed shard is recorded there by its file identity
(inode, size, modification and change times); `resume=True` reuses the shards that are still
those files and merges only the rest, with the same inputs (io.checkpoint's fingerprint) and
settings (resume.py). Bad input found mid-way (NaN in a tensor, a merged value that overflows
the output dtype, an input rewritten or replaced while it was read) removes the partial output;
an interruption leaves it for `resume`.
"""
import functools
import time
from contextlib import ExitStack
from pathlib import Path

from .. import api
from ..distributed import World
from ..errors import MergeInputError
from ..io.access import check_output
from ..io.checkpoint import layout_format
from ..io.write import output_metadata, parse_size, plan_shards, settings_metadata
from ..methods import get
from ..validate import check_device, check_models, exclude_patterns
from .pipeline import merge_my_shards
from .plan import Plan, batch_bytes, check_layouts, open_safetensors, plan_batches
from .ranked import KeyRankings
from .resume import fingerprint, finish_all, prepare


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
    memory; batches hold at most 256 MiB of inputs). An entrywise method (mean, linear, task
    arithmetic, MagMax) splits a key larger than a batch into spans of its entries, and so does
    TIES per tensor after a ranking pass over the whole key (streaming.ranked), so the budget
    holds whatever the key sizes (but for mergekit's exact trim, which ranks one expert's
    float32 magnitudes of the key whole); the SVD methods need a key whole, and a key larger
    than the budget is a batch of its own. max_shard_size: output shard size. resume: finish an
    interrupted merge of the same inputs and settings.
    side_files: paths, or (name, path) pairs from io.access.side_files, copied beside the
    weights. Methods must merge keys independently: TIES with scope="global" ranks entries over
    the whole model and is refused here (use scope="tensor", or the in-memory api.merge).
    """
    start = time.perf_counter()
    experts = list(experts)
    spec, opts = api.checked_method(method, options, len(experts))
    weights = api.checked_weights(weights, len(experts), spec, opts)
    if spec.coupling(opts):
        raise MergeInputError(f"{spec.coupling(opts)}; a streaming merge never holds the whole "
                              "model: merge in memory")
    exclude, alpha = exclude_patterns(exclude), api.checked_alpha(alpha)
    world = World()
    device = world.own_device(check_device(device))
    with ExitStack() as opened:
        models = [opened.enter_context(open_safetensors(p)) for p in (base, *experts)]
        names = [f"base {base}"] + [f"expert {e}" for e in experts]
        check_layouts(models, names)
        out = Path(out)
        check_output(out, [base, *experts, *(f for m in models for f in m.files),
                           *(item[1] if isinstance(item, tuple) else item for item in side_files)])
        shards = plan_shards(((k, i.nbytes) for k, i in models[0].infos.items()),
                             parse_size(max_shard_size))
        # the reference backend runs the literal per-key loop, on whole keys
        in_spans = spec.in_spans is not None and spec.in_spans.applies(opts) and \
            backend != "reference"
        batches = plan_batches(models, shards, batch_bytes(device, max_gpu_memory, max_memory),
                               split=spec.entrywise or in_spans)
        meta = output_metadata(settings_metadata(spec.name, opts, weights, alpha, exclude, base,
                                                 experts) | (metadata or {}), shards, side_files)
        plan = Plan(out, models, names, shards, meta,
                    fingerprint(models, meta, backend, device, dtype, shards), world)
        rankings = KeyRankings(plan, batches, spec, opts, weights, exclude, device, dtype) \
            if in_spans else None
        merge = functools.partial(_merge_batch, spec, opts, names, rankings, dict(
            weights=weights, alpha=alpha, exclude=exclude, backend=backend, device=device,
            dtype=dtype, allow_nonfinite=allow_nonfinite))
        with ExitStack() as locked:
            prepare(plan, locked, overwrite, resume)
            skipped = merge_my_shards(plan, batches, merge, device, progress, spec.name)
            finish_all(plan, side_files, overwrite)
    return plan.stats | {"seconds": time.perf_counter() - start, "out": str(out),
                         "shards_written": len(shards) - skipped, "shards_skipped": skipped,
                         "rank": world.rank, "ranks": world.size}


def _merge_batch(spec, opts, names, rankings, settings, batch, tensors):
    """One batch: the values checked (NaN, Inf) unless the method checks each output chunk
    itself (entrywise), then merged by the method already checked. (A ranked key's values are
    checked by its ranking as well, before it uses them; the ranking need not read every
    expert: mergekit's trim reads none of one that keeps all its entries.)"""
    ranked = rankings.of(batch) if rankings is not None else None
    check_models(tensors, names, values=not spec.entrywise)
    return api.merge_checked(tensors[0], tensors[1:], spec, opts, names=names, ranked=ranked,
                             **settings)


def streaming_refusal(settings):
    """Why `scoremerge merge` with these settings (config.MergeSettings) cannot stream, or None:
    every input must be a safetensors checkpoint, and the method must merge keys one by one."""
    for path in (settings.base, *settings.experts):
        if layout_format(path) != "safetensors":
            return f"{path} is not a safetensors checkpoint (a .safetensors file, or a folder " \
                   "with model.safetensors or model.safetensors.index.json)"
    return get(settings.method).coupling(settings.option)
