"""Merging model folders as `scoremerge merge` does: the choice between the factored LoRA merge,
the streaming merge and the in-memory one, and each one's checks, locking and output. The
command line and `scoremerge example` both call merge_folders."""
import sys
import time

from . import api
from .errors import MergeInputError, shown
from .io.access import check_output, output_lock, side_files
from .io.checkpoint import WEIGHT_FILES, Checkpoint
from .io.write import check_writable, settings_metadata, write_folder
from .lora import merge_adapter_checkpoints
from .lora.files import experts_are_adapters
from .streaming import merge_checkpoints, streaming_refusal
from .validate import check_models, exclude_patterns


def streams(settings):
    """Whether merge_folders(settings) will run the streaming merge (whose interruption keeps
    the completed shards for a resume)."""
    return not experts_are_adapters(settings.experts) and streaming_refusal(settings) is None


def merge_folders(settings):
    """Merge as `scoremerge merge` does, from validated config.MergeSettings: LoRA adapter
    folders in factored form (scoremerge.lora); full models streamed key batch by key batch
    when every input is safetensors and the method merges keys independently, else in memory.
    Returns the one-line summary the command prints."""
    if experts_are_adapters(settings.experts):
        return _merge_adapters(settings)
    if settings.out_adapter is not None or settings.adapter_rank is not None:
        flag = "--out-adapter" if settings.out_adapter is not None else "--adapter-rank"
        raise MergeInputError(f"{flag} needs LoRA adapters as --experts (folders with "
                              "adapter_config.json); these experts are full models")
    why_not = streaming_refusal(settings)
    if why_not is None:
        return _merge_streaming(settings)
    if settings.stream or settings.resume or settings.max_gpu_memory is not None \
            or settings.max_memory is not None:
        flag = "--stream" if settings.stream else "--resume" if settings.resume \
            else "--max-gpu-memory" if settings.max_gpu_memory is not None else "--max-memory"
        raise MergeInputError(f"{flag} needs the streaming merge, which cannot run: {why_not}")
    return _merge_in_memory(settings)


def _merge_streaming(settings):
    start = time.perf_counter()
    copied = _side_files(settings.base)
    stats = merge_checkpoints(
        settings.base, settings.experts, settings.out, settings.method,
        weights=settings.weights, alpha=settings.alpha, exclude=settings.exclude,
        backend=settings.backend, device=settings.device, dtype=settings.dtype,
        max_gpu_memory=settings.max_gpu_memory, max_memory=settings.max_memory,
        max_shard_size=settings.max_shard_size, overwrite=settings.overwrite,
        resume=settings.resume, progress=not settings.no_progress,
        metadata={"backend": settings.backend, **_schema(settings)}, side_files=copied,
        allow_nonfinite=settings.allow_nonfinite, **settings.option)
    seconds = time.perf_counter() - start
    rank = f" (rank {stats['rank']} of {stats['ranks']})" if stats["ranks"] > 1 else ""
    ranking = f", of which ranking keys in spans {stats['ranking_s']:.1f} s" \
        if stats["ranking_s"] else ""
    return (f"merged {len(settings.experts)} experts with {settings.method}{rank} in "
            f"{seconds:.2f} s, streaming: {stats['bytes_read'] / 1e9:.2f} GB read (read "
            f"{stats['read_s']:.1f} s, compute {stats['compute_s']:.1f} s{ranking}, write "
            f"{stats['write_s']:.1f} s; {stats['shards_skipped']} shard(s) reused) -> "
            f"{settings.out}")


def _merge_in_memory(settings):
    """Inputs opened and checked first; the output checked against them and locked before
    anything is read whole; the result written under the same lock."""
    paths = [settings.base, *settings.experts]
    names = [f"{'base' if i == 0 else 'expert'} {p}" for i, p in enumerate(paths)]
    copied = _side_files(settings.base)
    checkpoints = [Checkpoint(p) for p in paths]
    try:
        check_output(settings.out, [*paths, *(f for c in checkpoints for f in c.files),
                                *(real for _, real in copied)])
        with output_lock(settings.out):
            check_writable(settings.out, settings.overwrite)
            models = []
            for checkpoint in checkpoints:
                models.append(checkpoint.load())
                checkpoint.check_unchanged()
                checkpoint.close()
            spec, opts = api.checked_method(settings.method, settings.option, len(settings.experts))
            weights = api.checked_weights(settings.weights, len(settings.experts), spec, opts)
            check_models(models, names, values=not spec.entrywise)
            start = time.perf_counter()
            merged = api.merge_checked(
                models[0], models[1:], spec, opts, weights=weights, alpha=settings.alpha,
                exclude=exclude_patterns(settings.exclude), backend=settings.backend,
                device=settings.device, dtype=settings.dtype, progress=not settings.no_progress,
                allow_nonfinite=settings.allow_nonfinite, names=names)
            seconds = time.perf_counter() - start
            metadata = settings_metadata(settings.method, settings.option, weights,
                                         settings.alpha, settings.exclude, settings.base,
                                         settings.experts)
            metadata |= {"backend": settings.backend, **_schema(settings)}
            write_folder(merged, settings.out, metadata=metadata,
                         max_shard_size=settings.max_shard_size,
                         overwrite=settings.overwrite, extra_files=copied)
    finally:
        for checkpoint in checkpoints:
            checkpoint.close()
    return (f"merged {len(settings.experts)} experts with {settings.method} in {seconds:.2f} s "
            f"-> {settings.out}")


# Flags of the full-model merges that a LoRA merge (in memory, on the CPU) has no use for.
_NOT_FOR_ADAPTERS = {"stream": "--stream", "resume": "--resume",
                     "max_gpu_memory": "--max-gpu-memory", "max_memory": "--max-memory",
                     "allow_nonfinite": "--allow-nonfinite", "weights": "per-expert weights"}


def _merge_adapters(settings):
    """LoRA experts: merged in factored form (scoremerge.lora) into a full model or an adapter."""
    given = [flag for name, flag in _NOT_FOR_ADAPTERS.items() if getattr(settings, name)]
    if given:
        raise MergeInputError(f"{given[0]} is not supported when the experts are LoRA adapters "
                              "(their merge runs in memory, factored)")
    if settings.device not in (None, "cpu"):
        raise MergeInputError(f"--device {shown(settings.device)}: LoRA adapters are merged on the "
                              "CPU (every decomposition is of a rank-sized matrix)")
    if settings.adapter_rank is not None and settings.out_adapter is None:
        raise MergeInputError("--adapter-rank truncates a merged adapter: it needs --out-adapter")
    output = "adapter" if settings.out_adapter is not None else "full"
    out = settings.out_adapter if output == "adapter" else settings.out
    stats = merge_adapter_checkpoints(
        settings.base, settings.experts, out, settings.method, alpha=settings.alpha,
        output=output, rank=settings.adapter_rank, exclude=exclude_patterns(settings.exclude),
        dtype=settings.dtype, backend=settings.backend, max_shard_size=settings.max_shard_size,
        overwrite=settings.overwrite, metadata={"backend": settings.backend}, **settings.option)
    what = "model" if output == "full" else f"adapter of rank <= {stats['rank']}"
    truncated = f", largest truncation error {stats['max_error']:.3g}" \
        if settings.adapter_rank is not None else ""
    return (f"merged {len(settings.experts)} LoRA experts with {settings.method} ({stats['keys']} "
            f"modules, factored) in {stats['seconds']:.2f} s{truncated} -> {what} {out}")


def _schema(settings):
    """Metadata saying the settings came from a mergekit config (so with its conventions)."""
    return {"config_schema": settings.schema} if settings.schema != "scoremerge" else {}


def _side_files(base):
    """The base folder's configs and tokenizers to copy; each one refused by io.access is named
    on stderr, so a missing tokenizer in the output is never a surprise."""
    files, skipped = side_files(base, WEIGHT_FILES)
    for why in skipped.values():
        print(f"scoremerge: not copied: {why}", file=sys.stderr)
    return files
