"""Reading PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors or .bin) as
factored updates of a base model's weights.

PEFT saves, per adapted module `<module>` of the base model,
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (an
nn.Embedding: `.lora_embedding_A` [r, num] and `.lora_embedding_B` [dim, r]). The update of
the base weight `<module>.weight` is `scaling * B @ A`, transposed for embeddings and for
fan_in_fan_out (GPT-2's Conv1D, whose weight is [in, out]). scaling is lora_alpha / r, or
lora_alpha / sqrt(r) with use_rslora, with r and lora_alpha per module from rank_pattern /
alpha_pattern (PEFT's get_pattern_key: the first pattern p in the file's order with
re.match(rf"(.*\\.)?({p})$", module)). Here each update is stored in the weight's own
orientation, so B @ A always has the base weight's shape.

What changes the merged weight in ways a low-rank sum does not express is refused by name
(MergeInputError, the CLI's exit 2): see REFUSED and _check_config.
"""
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import MergeInputError, shown, shown_path
from ..io.access import member
from ..io.checkpoint import Checkpoint
from ..validate import all_finite
from .factored import LowRank

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")     # PEFT's own order
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 16 * 2**20
# init_lora_weights values whose saved factors are an update of the unmodified base.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Config fields that, when set (truthy), make the adapter something other than a plain sum of
# low-rank updates to the base weights: field -> why.
REFUSED = {
    "use_dora": "DoRA rescales each merged column to a learned magnitude: not a low-rank update",
    "modules_to_save": "the adapter carries full trained copies of these modules",
    "lora_bias": "lora_B carries a bias",
    "trainable_token_indices": "the adapter trains some embedding rows in full",
    "layer_replication": "the adapter changes the model's layer structure",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens, which "
                               "no merged weight can do",
    "use_qalora": "QA-LoRA adapts a pooled input, not the weight",
    "target_parameters": "LoRA on raw nn.Parameters (e.g. fused MoE experts) is not read here",
    "megatron_config": "Megatron-parallel layers are not read here",
    "ensure_weight_tying": "tied adapters share factors between modules",
    "velora_config": "a LoRA variant", "monteclora_config": "a LoRA variant",
    "arrow_config": "a LoRA variant (routing between adapters)", "kasa_config": "a LoRA variant",
    "use_bdlora": "a LoRA variant",
}
# Fields known to leave the update alone (selection of modules, training-only settings, names).
KNOWN = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
         "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
         "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "init_lora_weights",
         "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
         "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
         "qalora_group_size", "runtime_config", *REFUSED}


@dataclass(frozen=True)
class Target:
    """How one base weight is adapted: the PEFT module name, whether PEFT stores its factors as
    lora_embedding_A/B, and whether they are transposed to the weight (embeddings and
    fan_in_fan_out)."""
    module: str
    embedding: bool = False
    transposed: bool = False


@dataclass
class Adapter:
    """A PEFT LoRA adapter read against a base: updates {base key: LowRank in the weight's
    orientation}, targets {base key: Target}, the config as read, and base_copies {base key:
    tensor}: base weights the adapter file holds in full (PEFT saves an adapted embedding's
    base_layer), to be checked equal to the base (check_base_copies); files: the real paths
    read (an output may not be, hold or lie in them)."""
    path: Path
    config: dict
    updates: dict
    targets: dict
    base_copies: dict = field(default_factory=dict)
    files: tuple = ()


def is_adapter(path):
    """True when `path` is a PEFT adapter folder (it holds adapter_config.json) or its weights
    file (then that file is read, with the config beside it)."""
    path = Path(path)
    if path.is_file():
        return path.name in WEIGHT_NAMES
    return path.is_dir() and (path / CONFIG_NAME).exists()


def load_adapter(path, base_infos):
    """The adapter at `path` (a folder, or its adapter_model file) as factored updates of the
    base whose weights' shapes `base_infos` gives ({key: anything with .shape}: tensors, or
    io.checkpoint.Checkpoint(base).infos). Every target key must exist in the base with the
    update's shape, and each module's rank must be the one its config gives it.

    >>> adapter = load_adapter("lora1/", Checkpoint("base/").infos)
    >>> adapter.updates["model.layers.0.self_attn.q_proj.weight"].materialize()
    """
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not folder.is_dir():
        raise MergeInputError(f"{shown_path(path)}: no such adapter folder")
    config = read_config(folder)
    weights = member(folder, path.name, "adapter weights") if path.is_file() else \
        _weights_file(folder)
    with Checkpoint(weights) as checkpoint:
        tensors = checkpoint.load()
        checkpoint.check_unchanged()
    modules, copies = _modules(tensors, folder)
    adapter = Adapter(folder, config, {}, {}, {}, (member(folder, CONFIG_NAME, "config"), weights))
    for module, parts in modules.items():
        key, update, target = _read_module(module, parts, config, base_infos, folder)
        adapter.updates[key], adapter.targets[key] = update, target
    for key, tensor in copies.items():
        _check_key(key, tuple(tensor.shape), base_infos, folder, "a full copy of")
        adapter.base_copies[key] = tensor
    if not adapter.updates:
        raise MergeInputError(f"{shown_path(folder)}: the adapter holds no LoRA factors")
    return adapter


def read_config(folder):
    """adapter_config.json of `folder` as a dict, refused unless it is a plain LoRA."""
    real = member(folder, CONFIG_NAME, "adapter config")
    try:
        if real.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES >> 20} MiB")
        config = json.loads(real.read_bytes())
    except FileNotFoundError:
        raise MergeInputError(f"{shown_path(folder)}: no {CONFIG_NAME}; a PEFT adapter folder "
                              "holds one beside its weights") from None
    except (OSError, ValueError, RecursionError) as e:
        raise MergeInputError(f"{shown_path(real)}: not a readable JSON adapter config: "
                              f"{shown(str(e) or type(e).__name__)}") from None
    if not isinstance(config, dict):
        raise MergeInputError(f"{shown_path(real)}: must hold a JSON object, got a "
                              f"{type(config).__name__}")
    _check_config(config, real)
    return config


def _check_config(config, where):
    def refuse(why):
        raise MergeInputError(f"{shown_path(where)}: {why}; not supported")

    if config.get("peft_type") != "LORA":
        refuse(f"peft_type {shown(config.get('peft_type'))}: only LoRA adapters are merged here")
    for name, why in REFUSED.items():
        if config.get(name):
            refuse(f"{name}={shown(config[name])} ({why})")
    if config.get("bias") not in (None, "none"):
        refuse(f"bias={shown(config['bias'])} (the adapter trains the base's biases in full)")
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        refuse(f"init_lora_weights={shown(config['init_lora_weights'])} (this initialisation "
               "changes the base weights or the forward pass, so the factors are not an update "
               "of the base; PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) "
               "converts PiSSA, OLoRA and CorDA adapters into plain ones)")
    unknown = sorted(k for k, v in config.items() if k not in KNOWN and v)
    if unknown:
        refuse(f"unknown field(s) {[shown(k) for k in unknown[:5]]} set (from a newer PEFT?); "
               "refused rather than guessed at")
    for name in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(name) or {}, dict):
            refuse(f"{name} must map module patterns to numbers, got {shown(config[name])}")


def _weights_file(folder):
    for name in WEIGHT_NAMES:
        real = member(folder, name, "adapter weights")
        if real.is_file():
            return real
    raise MergeInputError(f"{shown_path(folder)}: no adapter weights: expected "
                          f"{' or '.join(WEIGHT_NAMES)}")


_FACTOR = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")


def _modules(tensors, folder):
    """({module: {"A": tensor, "B": tensor, "embedding": bool}}, {base key: full copy})."""
    modules, copies = {}, {}
    for name, tensor in tensors.items():
        if not name.startswith(PREFIX):
            raise MergeInputError(f"{shown_path(folder)}: key {shown(name)} does not start with "
                                  f"{PREFIX!r}; not a PEFT LoRA adapter file")
        rest = name[len(PREFIX):]
        if rest.endswith(".base_layer.weight"):
            copies[rest.removesuffix(".base_layer.weight") + ".weight"] = tensor
            continue
        match = _FACTOR.fullmatch(rest)
        if match is None:
            raise MergeInputError(f"{shown_path(folder)}: key {shown(name)} is not a LoRA factor "
                                  "(lora_A / lora_B); DoRA magnitudes, conv LoRA, biases and "
                                  "trained modules are not supported")
        module, part = match.groups()
        entry = modules.setdefault(module, {"embedding": part.startswith("lora_embedding")})
        if entry["embedding"] != part.startswith("lora_embedding"):
            raise MergeInputError(f"{shown_path(folder)}: module {shown(module)} mixes "
                                  "lora_embedding and lora_A/lora_B factors")
        entry["A" if "_A" in part else "B"] = tensor
    for module, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise MergeInputError(f"{shown_path(folder)}: module {shown(module)} has only "
                                  f"lora_{'A' if 'A' in parts else 'B'}")
    return modules, copies


def pattern_value(patterns, module, default):
    """PEFT's get_pattern_key: the value of the first pattern (in the config's order) that
    matches the module name as (.*\\.)?(pattern)$, else `default`."""
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error as e:
            raise MergeInputError(f"rank/alpha pattern {shown(pattern)} is not a regular "
                                  f"expression: {e}") from None
    return default


def scaling_of(config, module):
    """(r, scaling) that PEFT gives `module`: lora_alpha / r, or / sqrt(r) with use_rslora."""
    r = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if type(r) is not int or r <= 0 or isinstance(alpha, bool) \
            or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise MergeInputError(f"module {shown(module)}: r must be a positive integer and "
                              f"lora_alpha a finite number, got r={shown(r)}, "
                              f"lora_alpha={shown(alpha)}")
    return r, alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _read_module(module, parts, config, base_infos, folder):
    """(base key, LowRank in the weight's orientation, Target) for one adapted module."""
    A, B = parts["A"], parts["B"]
    where = f"{shown_path(folder)}: module {shown(module)}"
    if A.ndim != 2 or B.ndim != 2 or not A.is_floating_point() or B.dtype != A.dtype:
        raise MergeInputError(f"{where}: lora factors must be 2-D floating-point tensors of one "
                              f"dtype, got A {A.dtype} {tuple(A.shape)}, B {B.dtype} "
                              f"{tuple(B.shape)} (conv LoRA is not supported)")
    if not (all_finite(A) and all_finite(B)):
        raise MergeInputError(f"{where}: its factors contain NaN or Inf")
    r, scaling = scaling_of(config, module)
    if A.shape[0] != r or B.shape[1] != r:
        raise MergeInputError(f"{where}: the config gives rank {r}, the factors have A "
                              f"{tuple(A.shape)}, B {tuple(B.shape)}")
    transposed = parts["embedding"] or bool(config.get("fan_in_fan_out"))
    update = LowRank(A.mT, B.mT, scaling) if transposed else LowRank(B, A, scaling)
    key = f"{module}.weight"
    _check_key(key, update.shape, base_infos, folder, "the update of")
    return key, update, Target(module, parts["embedding"], transposed)


def _check_key(key, shape, base_infos, folder, what):
    if key not in base_infos:
        raise MergeInputError(f"{shown_path(folder)}: holds {what} {shown(key)}, which the base "
                              "does not have")
    want = tuple(base_infos[key].shape)
    if tuple(shape) != want:
        hint = " (fan_in_fan_out applies to every target: a model mixing Conv1D and Linear " \
               "targets is not supported)" if tuple(shape)[::-1] == want else ""
        raise MergeInputError(f"{shown_path(folder)}: {what} {shown(key)} is "
                              f"{list(shape)}, the base weight is {list(want)}{hint}")


def check_base_copies(adapter, read):
    """Refuse an adapter whose full copies of base weights differ from the base: read(key) is
    the base's tensor; equal means equal once the base is cast to the copy's dtype (a base
    trained in bf16 from an fp32 checkpoint)."""
    for key, copy in adapter.base_copies.items():
        if not torch.equal(read(key).to(copy.dtype), copy):
            raise MergeInputError(f"{shown_path(adapter.path)}: its saved base layer {shown(key)} "
                                  "differs from the base's (a resized or trained embedding?); "
                                  "not supported")
