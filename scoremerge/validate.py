"""Checks on whole models before anything is computed; every error names the key and model."""
import math
import re
from collections.abc import Mapping

import torch

from .errors import MergeInputError, shown

_LIST_AT_MOST = 10
# Floating-point dtypes a merge computes from; float8 checkpoints must be dequantized first.
MERGEABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _listing(keys):
    keys = sorted(keys)
    listed = ", ".join(shown(k) for k in keys[:_LIST_AT_MOST])
    return listed + (f" and {len(keys) - _LIST_AT_MOST} more" if len(keys) > _LIST_AT_MOST else "")


def finite_number(value, label):
    """value as a float, or MergeInputError "label: must be a finite number". A bool is an int
    to Python, but `alpha: true` is a mistake, not 1.0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MergeInputError(f"{label}: must be a finite number, got {shown(value)}")
    return float(value)


def check_dtype(key, dtype, name):
    """Refuse a floating-point dtype no merge computes from (float8), naming key and model."""
    if dtype.is_floating_point and dtype not in MERGEABLE:
        raise MergeInputError(f"key {shown(key)} of {name} is {dtype}: scoremerge merges float16, "
                              "bfloat16, float32 and float64 weights; dequantize it first")


def check_models(models, names, *, floating_only=False, values=True):
    """Same keys, same shapes, tensors only, no NaN or Inf in floating-point tensors.

    models: sequence of mappings key -> Tensor; names: how each model is called in messages.
    floating_only: every tensor must be floating point (task vectors). values=False skips the
    NaN/Inf scan, for a caller whose merge checks its outputs instead (methods.entrywise).
    """
    for model, name in zip(models, names):
        if not isinstance(model, Mapping):
            raise MergeInputError(f"{name} must be a mapping of names to tensors, got "
                                  f"{type(model).__name__}")
    first, first_name = models[0], names[0]
    check_same_keys(models, names)
    for key in first:
        for model, name in zip(models, names):
            x = model[key]
            if not isinstance(x, torch.Tensor):
                raise MergeInputError(f"key {shown(key)} of {name} is a {type(x).__name__}, not "
                                      "a tensor")
            if x.shape != first[key].shape:
                raise MergeInputError(f"shape mismatch at key {shown(key)}: {first_name} has "
                                      f"{tuple(first[key].shape)}, {name} has {tuple(x.shape)}")
            check_dtype(key, x.dtype, name)
            if x.is_floating_point():
                if values and not all_finite(x):
                    bad = "NaN" if torch.isnan(x).any() else "Inf"
                    raise MergeInputError(f"key {shown(key)} of {name} contains {bad}")
            elif floating_only:
                raise MergeInputError(f"key {shown(key)} of {name} is {x.dtype}; task vectors hold "
                                      "floating-point keys only (merge() copies integer buffers "
                                      "from the base)")
            elif x.dtype != first[key].dtype or not torch.equal(x.cpu(), first[key].cpu()):
                raise MergeInputError(f"non-float key {shown(key)} differs between {first_name} and "
                                      f"{name}; integer buffers are copied from the base, never "
                                      "merged, so they must agree")


def all_finite(x):
    """No NaN or Inf in the floating-point tensor x. One pass: the minimum and maximum are both
    finite exactly when every entry is (NaN propagates through both), and aminmax runs about ten
    times faster on the CPU than isfinite(x).all(), which writes a mask and reads it again."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def overflow_error(key, value, what):
    """The error for a merged `value` of key `key` that is not finite although its inputs are:
    the update overflows the output dtype."""
    bad = "NaN" if torch.isnan(value).any() else "Inf"
    dtype = value.dtype
    return MergeInputError(
        f"key {shown(key)} of the {what} holds {bad} in {str(dtype).removeprefix('torch.')} "
        f"(largest finite value {torch.finfo(dtype).max:.4g}): the merged update overflows it; "
        "lower alpha, or pass allow_nonfinite=True (--allow-nonfinite) to write it anyway")


def check_same_keys(models, names):
    """Every model (a mapping, or any collection of key names) has the first one's keys."""
    first, first_name = set(models[0]), names[0]
    for model, name in zip(models[1:], names[1:]):
        missing, extra = first - set(model), set(model) - first
        if missing or extra:
            parts = ([f"missing {len(missing)} key(s) of {first_name}: {_listing(missing)}"] if missing
                     else []) + ([f"has {len(extra)} key(s) {first_name} lacks: {_listing(extra)}"]
                                 if extra else [])
            raise MergeInputError(f"{name} does not have the keys of {first_name}: " + "; ".join(parts))


def exclude_patterns(exclude):
    """A tuple of compiled-checked regular expressions from a pattern or a list of them."""
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude or ())
    for p in patterns:
        try:
            re.compile(p)
        except (re.error, TypeError, RecursionError, OverflowError) as e:
            raise MergeInputError(f"exclude pattern {shown(p)} is not a regular expression: "
                                  f"{shown(str(e) or type(e).__name__)}") from None
    return patterns


def check_device(device):
    """torch.device(device) (the CPU for None) when scoremerge can compute there: the CPU, or a
    CUDA device that exists; anything else raises before any work."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise MergeInputError(f"device {shown(device)} is not a device; use cpu, cuda or "
                              "cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise MergeInputError(f"device {shown(str(device))}: scoremerge computes on cpu or cuda, "
                              f"not {dev.type}")
    if not torch.cuda.is_available():
        raise MergeInputError(f"device {shown(str(device))}: no CUDA device is available here")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MergeInputError(f"device {shown(str(device))}: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    return dev
