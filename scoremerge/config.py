"""Settings of `scoremerge merge` from a YAML or JSON file: `scoremerge merge --config FILE`.

The file has one key per `merge` flag (FILE_KEYS; `--max-shard-size` is `max_shard_size`, and
`--option KEY=VALUE ...` is the mapping `options`), in the spirit of mergekit's YAML:

    base: models/base
    experts:
      - models/math                          # a plain path
      - {path: models/code, weight: 0.7}     # or a path with a per-expert weight
    method: score
    options: {variant: diag, trim_multiplier: 2.0}
    alpha: 1.0
    exclude: [lm_head, embed]                # regular expressions, as --exclude
    dtype: float32
    max_shard_size: 5GB
    out: merged/

Paths in a file (base, experts, out, out_adapter) are relative to the file's folder, so a
config travels with its models; paths on the command line stay relative to the current folder.

A mergekit config (one with `merge_method`) is read too: mergekit_yaml translates it, with
mergekit's conventions, and its paths are relative to the current folder, as in mergekit.

Flags given on the command line override the file: each replaces the file's value, except
--option, whose KEY=VALUE pairs override the file's `options` one key at a time. Giving
--experts replaces the file's experts together with their weights. The result is checked the
same way whether it came from a file, the command line or both.
"""
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from .api import COMPUTE_DTYPES
from .backend import BACKENDS
from .errors import MergeInputError, shown
from .io.write import DEFAULT_MAX_SHARD_SIZE, parse_size
from .mergekit_yaml import is_mergekit_config, translate
from .methods import get
from .validate import check_device, finite_number

# The one map between the two: `merge` flag (argparse dest) -> key in a config file.
FILE_KEYS = {
    "base": "base", "experts": "experts", "method": "method", "alpha": "alpha",
    "exclude": "exclude", "option": "options", "device": "device", "dtype": "dtype",
    "backend": "backend", "max_shard_size": "max_shard_size", "max_gpu_memory": "max_gpu_memory",
    "max_memory": "max_memory",
    "overwrite": "overwrite", "no_progress": "no_progress", "resume": "resume",
    "stream": "stream", "allow_nonfinite": "allow_nonfinite", "out": "out",
    "out_adapter": "out_adapter", "adapter_rank": "adapter_rank", "weights": "weights",
}
REQUIRED = ("base", "experts")          # and one of out, out_adapter
MAX_CONFIG_BYTES = 1 << 20
# For cli.py: `set_defaults(**CLI_UNSET)` keeps a flag that was not typed at None, so that the
# file's value (or MergeSettings' default) shows through instead of argparse's default.
CLI_UNSET = dict.fromkeys(FILE_KEYS)


@dataclass(frozen=True)
class MergeSettings:
    """Everything `scoremerge merge` needs, validated: one field per flag, same names; weights:
    one per expert, or None (--weights, a file's `weights`, or its experts' `weight`). Exactly
    one of
    out (a model folder) and out_adapter (a PEFT adapter folder: LoRA experts only) is set."""
    base: str
    experts: tuple
    out: str = None
    out_adapter: str = None
    adapter_rank: int = None
    weights: tuple = None
    method: str = "score"
    alpha: float = 1.0
    exclude: tuple = ()
    option: dict = field(default_factory=dict)    # parsed by the method: its defaults filled in
    device: str = None
    dtype: str = None
    backend: str = "auto"
    max_shard_size: object = DEFAULT_MAX_SHARD_SIZE    # a size string or a byte count
    max_gpu_memory: object = None
    max_memory: object = None
    overwrite: bool = False
    no_progress: bool = False
    resume: bool = False
    stream: bool = False
    allow_nonfinite: bool = False
    schema: str = "scoremerge"      # or "mergekit": the file was a mergekit config (mergekit_yaml)
    notes: tuple = ()               # what reading a mergekit config chose, for the user


def merge_settings(config_path=None, **values):
    """MergeSettings from `values` (the flags' names: base=, experts=[...], method=, out=,
    option=["k=v"], ...) and the .yaml/.yml or .json file config_path, the values winning;
    validated as the command line's are. A bad file or value raises MergeInputError naming the
    file, the field (`experts[2].weight`) and what is wrong."""
    return merge_settings_from(SimpleNamespace(**values), config_path)


def merge_settings_from(args, config_path=None):
    """MergeSettings from parsed `merge` arguments and the file config_path (default:
    args.config), flags given on the command line winning. A flag counts as given when its
    value is not None, so the parser must leave untyped flags at None (CLI_UNSET). In cli.py:

        m.add_argument("--config", metavar="FILE", help="YAML or JSON file of these settings")
        m.set_defaults(run=_merge, **CLI_UNSET)        # and --base/--experts/--out not required
        ...
        def _merge(args):
            args = merge_settings_from(args)           # args.option: a dict, already parsed
    """
    config_path = config_path or getattr(args, "config", None)
    given = {dest: getattr(args, dest) for dest in FILE_KEYS
             if getattr(args, dest, None) is not None}    # getattr: flags cli.py may not have yet
    if "option" in given:
        given["option"] = _option_pairs(given["option"])
    return _validate(_read(config_path) if config_path else {}, given, config_path)


def _read(path):
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise MergeInputError(f"{path}: a config file must end in .yaml, .yml or .json")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise MergeInputError(f"{path}: a config file is at most {MAX_CONFIG_BYTES >> 10} "
                                  "KiB; this one is larger")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MergeInputError(f"{path}: cannot read the config file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise MergeInputError(f"{path}: a config file must be UTF-8 text") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MergeInputError(f"{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}") \
                from None
        except RecursionError:
            raise MergeInputError(f"{path}: not a config: nested too deeply") from None
    else:
        data = _load_yaml(text, path)
    if not isinstance(data, dict):
        raise MergeInputError(f"{path}: must be a mapping of settings (key: value), "
                              f"got {'an empty file' if data is None else type(data).__name__}")
    if is_mergekit_config(data):
        return translate(data, path)
    _known_keys(data, FILE_KEYS.values(), str(path))
    return data


def _load_yaml(text, path):
    """PyYAML is imported here, not at import time: JSON configs and the rest of the package
    work without it. Aliases (`*name`) are refused: a few of them can stand for 10^9 values
    (the "billion laughs"), and a merge config never needs one."""
    try:
        import yaml
    except ImportError:
        raise MergeInputError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or "
                              "write the config as .json") from None

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise MergeInputError(f"{path}:{mark.line + 1}:{mark.column + 1}: YAML aliases "
                                      "(*name) are not accepted in a config; write the value out")
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliases)
    except RecursionError:
        raise MergeInputError(f"{path}: not a config: nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise MergeInputError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") \
            from None


def _validate(file_values, given, path):
    """One check per setting, wherever it came from; labels say where: `cfg.yaml: alpha` or
    `--alpha`."""
    if "option" in given and "options" in file_values:
        given["option"] = {**_mapping(file_values["options"], f"{path}: options"),
                           **given["option"]}
    settings, labels, weights = {}, {}, None
    schema = file_values.get("schema", "scoremerge")
    # mergekit resolves its paths from the current folder; scoremerge's files from their own
    file_root = None if schema == "mergekit" else Path(path).parent if path else None
    for dest, key in FILE_KEYS.items():
        if dest in given:
            value, label, root = given[dest], "--" + dest.replace("_", "-"), None
        elif key in file_values:
            value, label, root = file_values[key], f"{path}: {key}", file_root
        elif dest in REQUIRED:
            flag = "--" + dest
            raise MergeInputError(f"{path}: missing required key {key!r} (or give {flag})" if path
                                  else f"{flag} is required (or give it in a --config file)")
        else:
            continue
        labels[dest] = label
        if dest == "experts":
            value, weights = _experts(value, label, root)
            if weights is not None:
                labels["weights"] = label
        elif dest == "weights":
            continue                                   # after experts: below
        else:
            value = _CHECKS[dest](value, label)
            if dest in ("base", "out", "out_adapter"):
                value = _resolve(value, root)
        settings[dest] = value

    if "out" in settings and "out_adapter" in settings:
        raise MergeInputError(f"{labels['out']} and {labels['out_adapter']}: give one of them, "
                              "not both")
    if "out" not in settings and "out_adapter" not in settings:
        raise MergeInputError(
            f"{path}: missing required key 'out' (or give --out), or out_adapter for a merged "
            "LoRA adapter" if path else "--out is required (or give it in a --config file), or "
            "--out-adapter for a merged LoRA adapter")
    weights = _weights(given, file_values, weights, labels, path, len(settings["experts"]))
    method = settings.get("method", MergeSettings.method)
    spec = _with_label(labels.get("method", "method"), get, method)
    settings["option"] = _with_label(labels.get("option", "options"), spec.parse_options,
                                     settings.get("option", {}), len(settings["experts"]))
    return MergeSettings(**settings, weights=weights, schema=schema,
                         notes=tuple(file_values.get("notes", ())))


def _weights(given, file_values, inline, labels, path, n_experts):
    """The per-expert weights: --weights, else the file's `weights` or its experts' `weight`
    (not both), else None; one per expert."""
    if "weights" in given:
        value, label = given["weights"], "--weights"
    elif "weights" in file_values and "experts" not in given:
        if inline is not None:
            raise MergeInputError(f"{path}: weights are given twice: in `weights` and in the "
                                  "experts' `weight` entries; keep one")
        value, label = file_values["weights"], f"{path}: weights"
    else:
        return inline
    if not isinstance(value, (list, tuple)):
        raise _type_error(label, "a list of numbers, one per expert", value)
    weights = tuple(finite_number(w, f"{label}[{i}]") for i, w in enumerate(value))
    if len(weights) != n_experts:
        raise MergeInputError(f"{label}: one weight per expert: {n_experts} expert(s), "
                              f"{len(weights)} weight(s)")
    return weights


def _with_label(label, fn, *args):
    """fn(*args), its MergeInputError prefixed with where the value came from."""
    try:
        return fn(*args)
    except MergeInputError as e:
        raise MergeInputError(f"{label}: {e}") from None


def _known_keys(mapping, known, label):
    for key in mapping:
        if key not in known:
            hint = difflib.get_close_matches(str(key)[:100], known, n=1)
            hint = f"; did you mean {hint[0]!r}?" if hint else ""
            raise MergeInputError(f"{label}: unknown key {shown(key)} (known: "
                                  f"{', '.join(known)}){hint}")


def _experts(value, label, root):
    """(paths, weights or None) from a list of paths or {path, weight} mappings."""
    if not isinstance(value, (list, tuple)) or not value:
        raise MergeInputError(f"{label}: must be a non-empty list of expert paths")
    paths, weights = [], []
    for i, entry in enumerate(value):
        where = f"{label}[{i}]"
        weight = None
        if isinstance(entry, dict):
            _known_keys(entry, ("path", "weight"), where)
            if "path" not in entry:
                raise MergeInputError(f"{where}: missing 'path'")
            if "weight" in entry:
                weight = finite_number(entry["weight"], f"{where}.weight")
            entry, where = entry["path"], f"{where}.path"
        paths.append(_resolve(_string(entry, where), root))
        weights.append(weight)
    if any(w is None for w in weights) and any(w is not None for w in weights):
        missing = next(i for i, w in enumerate(weights) if w is None)
        raise MergeInputError(f"{label}[{missing}]: has no weight while other experts have one; "
                              "give every expert a weight or none")
    return tuple(paths), None if weights[0] is None else tuple(weights)


def _resolve(path, root):
    path = Path(path).expanduser()
    return str(path if root is None or path.is_absolute() else root / path)


def _option_pairs(pairs):
    """{key: value string} from the command line's KEY=VALUE pairs."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MergeInputError(f"--option {shown(pair)} is not KEY=VALUE")
        options[key] = value
    return options


def _type_error(label, wanted, value):
    return MergeInputError(f"{label}: must be {wanted}, got {shown(value)}")


def _string(value, label):
    if not isinstance(value, str) or not value:
        raise _type_error(label, "a non-empty string", value)
    return value


def _flag(value, label):
    if not isinstance(value, bool):
        raise _type_error(label, "true or false", value)
    return value


def _mapping(value, label):
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _type_error(label, "a mapping of option names to values", value)
    return dict(value)


def _patterns(value, label):
    if not isinstance(value, (list, tuple)):
        raise _type_error(label, "a list of regular expressions", value)
    for i, pattern in enumerate(value):
        try:
            re.compile(_string(pattern, f"{label}[{i}]"))
        except (re.error, RecursionError, OverflowError) as e:
            raise MergeInputError(f"{label}[{i}]: {shown(pattern)} is not a regular expression: "
                                  f"{shown(str(e) or type(e).__name__)}") from None
    return tuple(value)


def _positive_int(value, label):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _type_error(label, "a positive integer", value)
    return value


def _size(value, label):
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _type_error(label, "a size such as 5GB", value)
    _with_label(label, parse_size, value)
    return value


def _choice(choices):
    def check(value, label):
        if value not in choices:
            raise _type_error(label, f"one of {', '.join(choices)}", value)
        return value
    return check


def _device(value, label):
    _with_label(label, check_device, _string(value, label))
    return value


def _or_none(check):
    return lambda value, label: None if value is None else check(value, label)


_CHECKS = {
    "base": _string, "out": _string, "out_adapter": _string, "method": _string,
    "alpha": finite_number, "adapter_rank": _or_none(_positive_int),
    "exclude": _patterns, "option": _mapping, "device": _or_none(_device),
    "dtype": _or_none(_choice(sorted(COMPUTE_DTYPES))),
    "backend": _choice(BACKENDS + ("reference",)),
    "max_shard_size": _size, "max_gpu_memory": _or_none(_size),
    "max_memory": _or_none(_size), "overwrite": _flag,
    "no_progress": _flag, "resume": _flag, "stream": _flag, "allow_nonfinite": _flag,
}
