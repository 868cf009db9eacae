"""File to file: a base checkpoint and PEFT adapter folders in, the merged model or a merged
adapter folder out (what `scoremerge merge --experts ADAPTER_DIR ...` runs).

The base is opened once (io.checkpoint); with output="adapter" only its header is read (and
any weight an adapter holds a copy of), never its tensors. The output is checked against every
input before any work, locked, built hidden and renamed into place, as every merge does.
"""
import json
import time
from pathlib import Path

from ..api import checked_method
from ..errors import MergeInputError, shown, shown_path
from ..io.access import check_output, output_lock, side_files
from ..io.checkpoint import WEIGHT_FILES, Checkpoint
from ..io.write import DEFAULT_MAX_SHARD_SIZE, check_writable, write_folder
from .adapter import check_base_copies, is_adapter, load_adapter
from .merge import merge_adapters
from .writer import check_adapter_replaceable, write_adapter_folder


def experts_are_adapters(paths):
    """True when every path is a PEFT adapter, False when none is; a mix is refused."""
    flags = [is_adapter(p) for p in paths]
    if any(flags) and not all(flags):
        adapters = [str(p) for p, f in zip(paths, flags) if f]
        raise MergeInputError(f"experts mix LoRA adapters ({shown_path(adapters[0])}, ...) and "
                              "full models; merge one kind at a time")
    return bool(flags) and all(flags)


def merge_adapter_checkpoints(base, adapters, out, method="score", *, alpha=1.0, output="full",
                              rank=None, exclude=(), dtype=None, backend="auto",
                              max_shard_size=DEFAULT_MAX_SHARD_SIZE, overwrite=False,
                              metadata=None, **options):
    """Merge the PEFT adapters (folders) trained on `base` (a checkpoint file or folder) into
    `out`: output="full" writes the whole merged model (safetensors, sharded above
    max_shard_size, with the base folder's configs and tokenizers), output="adapter" a PEFT
    adapter folder (rank: truncate every module to it). Returns {"keys", "rank", "max_error",
    "seconds"}: keys merged, the largest merged rank (adapter output), the largest truncation
    error, the merge's seconds.

    >>> merge_adapter_checkpoints("base/", ["lora1/", "lora2/"], "merged/", "score", alpha=1.0)
    """
    adapters = [Path(p) for p in adapters]
    _check_settings(method, options, len(adapters), output, rank)
    with Checkpoint(base) as checkpoint:
        state = None if checkpoint.format == "safetensors" else checkpoint.load()
        infos = checkpoint.infos if state is None else state
        loaded = [load_adapter(p, infos) for p in adapters]
        copied = side_files(base, WEIGHT_FILES)[0] if output == "full" else []
        check_output(out, [base, *checkpoint.files, *adapters,
                           *(f for a in loaded for f in a.files), *(real for _, real in copied)])
        meta = {"method": method, "options": json.dumps(options, sort_keys=True, default=str),
                "alpha": alpha, "exclude": json.dumps(list(exclude)), "base": str(base),
                "experts": json.dumps([str(p) for p in adapters]), "output": output,
                "rank": rank, **(metadata or {})}
        with output_lock(out):
            if output == "full":
                check_writable(out, overwrite)
                state = state if state is not None else checkpoint.load()
            else:
                check_adapter_replaceable(Path(out), overwrite)
            read = state.__getitem__ if state is not None else checkpoint.read
            for adapter in loaded:
                check_base_copies(adapter, read)
            checkpoint.check_unchanged()
            start = time.perf_counter()
            merged = merge_adapters(state if output == "full" else infos, loaded, method,
                                    alpha=alpha, output=output, rank=rank, exclude=exclude,
                                    dtype=dtype, backend=backend, **options)
            seconds = time.perf_counter() - start
            if output == "full":
                write_folder({**state, **merged}, out, metadata=meta,
                             max_shard_size=max_shard_size, overwrite=overwrite,
                             extra_files=copied)
                return {"keys": len(merged), "rank": None, "max_error": 0.0, "seconds": seconds}
            write_adapter_folder(merged, out, like=loaded[0].config, metadata=meta,
                                 overwrite=overwrite)
            return {"keys": len(merged.updates),
                    "rank": max(u.rank for u in merged.updates.values()),
                    "max_error": max(merged.errors.values()), "seconds": seconds}


def _check_settings(method, options, n_experts, output, rank):
    """What merge_adapters would refuse, refused before any file is read."""
    checked_method(method, options, n_experts)
    if not n_experts:
        raise MergeInputError("no adapters given: merging needs at least one LoRA expert")
    if output not in ("full", "adapter"):
        raise MergeInputError(f"output must be 'full' or 'adapter', got {shown(output)}")
    if rank is not None and output != "adapter":
        raise MergeInputError("rank truncates a merged adapter: it needs output='adapter'")
