"""LoRA experts merged in factored form.

PEFT adapters of one base are read as factored task vectors (load_adapter), merged with SCORE,
TSV-M, Iso-C, Iso-CTS, task arithmetic or mean without forming a weight-sized matrix (TIES and
MagMax per key on the materialized updates), and written as the merged full model or a merged
PEFT adapter. scoremerge.lora.reference is the dense version of every op and method.

    from scoremerge.io.checkpoint import Checkpoint
    from scoremerge.lora import load_adapter, merge_adapters, save_adapter
    with Checkpoint("base/") as base:
        experts = [load_adapter(p, base.infos) for p in ("lora1/", "lora2/", "lora3/")]
        merged = merge_adapters(base.infos, experts, "score", output="adapter")
    save_adapter(merged, "merged_lora/", like=experts[0].config)
"""
from . import factored, reference
from .adapter import Adapter, Target, is_adapter, load_adapter
from .factored import LowRank
from .files import experts_are_adapters, merge_adapter_checkpoints
from .merge import MergedAdapter, merge_adapters, merge_factored
from .writer import save_adapter

__all__ = ["Adapter", "LowRank", "MergedAdapter", "Target", "experts_are_adapters", "factored",
           "is_adapter", "load_adapter", "merge_adapter_checkpoints", "merge_adapters",
           "merge_factored", "reference", "save_adapter"]
