"""Write a merged adapter as a PEFT LoRA folder that PeftModel.from_pretrained loads.

Every module's scaling is 1 (lora_alpha = r, per module through rank_pattern and alpha_pattern
keyed by the full module name, as PEFT's own conversion writes them), so PEFT's merged weight is
base + B @ A exactly as merged. The folder is built hidden beside the target and renamed into
place under io.access's output lock; the weights carry scoremerge's marker and file list, so
--overwrite may later replace the folder (and only such a folder).
"""
import json
import shutil
from collections import Counter
from pathlib import Path

from ..errors import MergeInputError, shown
from ..io.access import (FILES_KEY, MARKER_KEY, check_output, check_replaceable, member,
                         output_lock)
from ..io.atomic import make_temp_dir, replace_folder
from ..io.checkpoint import Checkpoint
from ..io.shard_writer import ShardWriter
from ..io.write import output_metadata
from .adapter import CONFIG_NAME, PREFIX, WEIGHT_NAMES

WEIGHTS_NAME = WEIGHT_NAMES[0]
# Fields of the experts' config carried over: what PEFT needs to pick the model class.
CARRIED = ("task_type", "base_model_name_or_path", "revision", "auto_mapping")


def peft_tensors(merged, dtype=None):
    """{PEFT key: tensor} for a MergedAdapter, each factor in the orientation PEFT stores."""
    out = {}
    for key in sorted(merged.updates):
        update, target = merged.updates[key], merged.targets[key]
        B, A = update.factors(dtype)
        if target.transposed:        # PEFT's update is (B_p A_p)^T: B_p = A^T, A_p = B^T
            B, A = A.mT, B.mT
        stem = f"{PREFIX}{target.module}"
        names = ("lora_embedding_B", "lora_embedding_A") if target.embedding else \
            ("lora_B.weight", "lora_A.weight")
        out[f"{stem}.{names[0]}"] = B.contiguous()
        out[f"{stem}.{names[1]}"] = A.contiguous()
    return out


def peft_config(merged, like=None):
    """adapter_config.json's contents: the most common rank as r, the others by pattern;
    `like`: an expert's config, whose task type and base model name are carried over."""
    ranks = {merged.targets[k].module: u.rank for k, u in merged.updates.items()}
    if not ranks:
        raise MergeInputError("the merged update is zero on every key: there is no adapter to "
                              "write (PEFT has no rank-0 modules)")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != r}
    transposed = any(t.transposed and not t.embedding for t in merged.targets.values())
    return {**{k: (like or {}).get(k) for k in CARRIED}, "peft_type": "LORA", "r": r,
            "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(ranks), "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": transposed, "bias": "none", "lora_dropout": 0.0,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def save_adapter(merged, out, *, like=None, dtype=None, metadata=None, overwrite=False, inputs=()):
    """Write the MergedAdapter `merged` to the folder `out` (adapter_config.json and
    adapter_model.safetensors). like: an expert's config (task type, base model name); dtype:
    of the written factors (default: as merged); inputs: files and folders the merge read, which
    out may not be, hold or lie in."""
    out = Path(out)
    check_output(out, inputs)
    with output_lock(out):
        return write_adapter_folder(merged, out, like=like, dtype=dtype, metadata=metadata,
                                    overwrite=overwrite)


def write_adapter_folder(merged, out, *, like=None, dtype=None, metadata=None, overwrite=False):
    """save_adapter for a caller that holds the output lock."""
    out = Path(out)
    check_adapter_replaceable(out, overwrite)
    config = peft_config(merged, like)
    tensors = peft_tensors(merged, dtype)
    meta = output_metadata(metadata, [WEIGHTS_NAME], [CONFIG_NAME])
    tmp = make_temp_dir(out)
    try:
        layout = {k: (t.dtype, t.shape) for k, t in tensors.items()}
        writer = ShardWriter(tmp / WEIGHTS_NAME, layout, meta)
        try:
            for key, tensor in tensors.items():
                writer.put(key, tensor)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_adapter_replaceable(out, overwrite):
    """io.access.check_replaceable for an adapter folder: with overwrite, a non-empty `out` is
    replaced only when its adapter weights carry scoremerge's marker and list every file in it."""
    if not (overwrite and out.is_dir() and not out.is_symlink() and any(out.iterdir())):
        return check_replaceable(out, overwrite)
    try:
        with Checkpoint(member(out, WEIGHTS_NAME, "adapter weights")) as previous:
            meta = previous.metadata
        recorded = set(json.loads(meta[FILES_KEY])) if MARKER_KEY in meta else set()
    except (MergeInputError, KeyError, ValueError, TypeError):
        recorded = set()
    for path in out.iterdir():
        if path.is_symlink() or not path.is_file() or path.name not in recorded:
            raise MergeInputError(f"{out}: --overwrite replaces only a folder a previous "
                                  f"scoremerge merge wrote, and it holds {shown(path.name)}, "
                                  "which no merge wrote there; choose another output folder")
