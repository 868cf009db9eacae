"""mergekit's YAML configs, read as scoremerge merge settings (`scoremerge merge --config`).

A config is mergekit's when it has `merge_method` (scoremerge's own files say `method`). It is
translated into a scoremerge config mapping (config.py checks the result as it checks its own
files), with mergekit's conventions as options, so the merge gives mergekit's result:

    mergekit                         scoremerge
    linear (weight, normalize)       linear, weights            (average of the models)
    task_arithmetic (weight, lambda) task_arithmetic, weights, alpha = lambda
      with normalize: true           mean, weights              (sum w tau / sum w)
    ties (weight, density, lambda)   ties, weights, density per model, alpha = lambda,
                                     scope=tensor trim=exact zero_sign=plus,
                                     disjoint=mean (normalize: true, mergekit's default) or sum
    score, tsv, iso_c, iso_cts,      the same method; `parameters` are its options, `weight`
    magmax, mean                     the per-model weights, `lambda` alpha

What mergekit has and scoremerge does not is refused by name (MergeInputError), never dropped:
hub ids and revisions, `model+lora` references, slices/modules (frankenmerges), gradient lists
and `filter:` conditions, tokenizer unions and chat templates, other methods and parameters.
Paths are relative to the current folder, as mergekit resolves them (not to the config file).
"""
import math
from pathlib import Path

from .errors import MergeInputError, shown
from .validate import finite_number

SCHEMA_KEY = "merge_method"
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "slices", "modules", "tokenizer", "chat_template")
SCOREMERGE_METHODS = ("score", "tsv", "iso_c", "iso_cts", "magmax", "mean")
# mergekit's shared (whole-merge) parameters per method, with mergekit's defaults.
SHARED = {
    "linear": {"normalize": True},
    "task_arithmetic": {"normalize": False, "lambda": 1.0, "int8_mask": False,
                        "rescale": False},
    "ties": {"normalize": True, "lambda": 1.0, "int8_mask": False, "rescale": False},
}
PER_MODEL = {"linear": ("weight",), "task_arithmetic": ("weight", "density"),
             "ties": ("weight", "density")}
COMPUTE_DTYPES = ("float32", "float64")
HALF_DTYPES = ("bfloat16", "float16", "bf16", "fp16", "half")
NOT_SUPPORTED = {
    "slices": "slices (layer_range frankenmerges) are not supported: scoremerge merges whole "
              "models with the same keys; run this config with mergekit",
    "modules": "modules are not supported: scoremerge merges whole models; run this config with "
               "mergekit",
    "tokenizer": "tokenizer settings are not supported: the output gets the base model's "
                 "tokenizer files (tokenizer_source: base)",
    "chat_template": "chat_template is not supported: the output gets the base model's tokenizer "
                     "files; edit tokenizer_config.json afterwards",
}


def is_mergekit_config(data):
    return isinstance(data, dict) and SCHEMA_KEY in data


def translate(data, path):
    """The scoremerge config mapping for mergekit config `data` read from `path`, plus "schema":
    "mergekit" and "notes": what the translation chose, for the user to see."""
    where = str(path)
    for key in data:
        if key not in TOP_KEYS:
            raise MergeInputError(f"{where}: {shown(key)} is not a mergekit config key scoremerge "
                                  f"reads (it reads: {', '.join(TOP_KEYS)})")
        if key in NOT_SUPPORTED and data[key] is not None:
            raise MergeInputError(f"{where}: {key}: {NOT_SUPPORTED[key]}")
    method = data["merge_method"]
    if method not in (*SHARED, *SCOREMERGE_METHODS):
        raise MergeInputError(
            f"{where}: merge_method: {shown(method)} is not one scoremerge runs (it runs "
            f"{', '.join((*SHARED, *SCOREMERGE_METHODS))}); run mergekit's own methods with "
            "mergekit (`scoremerge mergekit CONFIG OUT` runs mergekit with scoremerge's methods "
            "added)")
    source = data.get("tokenizer_source")
    if source not in (None, "base"):
        raise MergeInputError(f"{where}: tokenizer_source: {shown(source)} is not supported: the "
                              "output gets the base model's tokenizer files (tokenizer_source: "
                              "base)")
    if not isinstance(data.get("models"), list) or not data["models"]:
        raise MergeInputError(f"{where}: models: must be a non-empty list of {{model: PATH, "
                              "parameters: {...}}} entries")
    base = _model_path(data["base_model"], f"{where}: base_model") \
        if data.get("base_model") is not None else None
    models = [_model_entry(m, f"{where}: models[{i}]") for i, m in enumerate(data["models"])]
    shared = _parameters(data.get("parameters"), f"{where}: parameters")
    notes = []
    listed = any(Path(p).resolve() == Path(base).resolve() for p, _ in models) if base else False
    if method != "linear":
        if base is None:
            raise MergeInputError(f"{where}: base_model: {method} needs a base model")
        # a model listed as the base is the base, not an expert (as in mergekit)
        models = [m for m in models if Path(m[0]).resolve() != Path(base).resolve()]
    elif base is None:
        base = models[0][0]
        notes.append(f"no base_model: {base} names the keys and gives the side files")
    elif not listed:
        # mergekit's linear averages the base_model too, with the shared weight
        if "weight" not in shared:
            raise MergeInputError(f"{where}: base_model: mergekit's linear averages the base "
                                  "model too and needs its weight: list it in models with a "
                                  "weight, give parameters.weight, or drop base_model")
        models = [(base, {}), *models]
    if not models:
        raise MergeInputError(f"{where}: models: no model besides the base to merge")
    out = {"base": base, "experts": [p for p, _ in models], "schema": "mergekit"}
    if method in SHARED:
        out.update(_mergekit_method(method, models, shared, where, notes))
    else:
        out.update(_scoremerge_method(method, models, shared, where))
    out.update(_dtypes(data, where, notes))
    out["notes"] = notes
    return out


def _mergekit_method(method, models, shared, where, notes):
    """method, weights, options and alpha reproducing mergekit's `method`."""
    for name in shared:
        if name not in SHARED[method] and name not in PER_MODEL[method]:
            raise MergeInputError(f"{where}: parameters: {shown(name)} is not a parameter of "
                                  f"mergekit's {method} that scoremerge reproduces (it reads: "
                                  f"{', '.join((*SHARED[method], *PER_MODEL[method]))})")
    settings = {**SHARED[method], **{k: v for k, v in shared.items() if k in SHARED[method]}}
    for name in ("normalize", "int8_mask", "rescale"):
        if name in settings and not isinstance(settings[name], bool):
            raise MergeInputError(f"{where}: parameters.{name}: must be true or false, got "
                                  f"{shown(settings[name])}")
    if settings.get("rescale"):
        raise MergeInputError(f"{where}: parameters.rescale: true is not supported (DARE's "
                              "rescaling); run this config with mergekit")
    if settings.get("int8_mask"):
        notes.append("int8_mask: accepted; it changes no merged value")
    per_model = {}
    for name in PER_MODEL[method]:
        default = shared.get(name, 1.0)
        per_model[name] = [finite_number(params.get(name, default),
                                         f"{where}: models[{i}].parameters.{name}")
                           for i, (_, params) in enumerate(models)]
    for i, (_, params) in enumerate(models):
        for name in params:
            if name not in PER_MODEL[method]:
                raise MergeInputError(f"{where}: models[{i}].parameters: {shown(name)} is not a "
                                      f"per-model parameter of mergekit's {method} that scoremerge "
                                      f"reproduces (it reads: {', '.join(PER_MODEL[method])})")
    weights = per_model["weight"]
    if method == "linear":
        return {"method": "linear", "weights": weights,
                "options": {"normalize": settings["normalize"]}}
    alpha = finite_number(settings["lambda"], f"{where}: parameters.lambda")
    if method == "task_arithmetic":
        if any(d != 1.0 for d in per_model["density"]):
            raise MergeInputError(f"{where}: density: mergekit's task_arithmetic does not trim "
                                  "(it ignores density); remove it, or use ties")
        if settings["normalize"]:
            # mergekit leaves the sum unnormalised when the weights sum to about 0
            if abs(math.fsum(weights)) < 1e-8:
                raise MergeInputError(f"{where}: normalize: the weights sum to 0")
            notes.append("task_arithmetic with normalize: true is scoremerge's weighted mean")
            return {"method": "mean", "weights": weights, "alpha": alpha}
        return {"method": "task_arithmetic", "weights": weights, "alpha": alpha}
    densities = per_model["density"]
    for i, d in enumerate(densities):
        if not 0 < d <= 1:
            raise MergeInputError(f"{where}: models[{i}] density: must be in (0, 1], got {d}")
    options = {"scope": "tensor", "trim": "exact", "zero_sign": "plus",
               "disjoint": "mean" if settings["normalize"] else "sum",
               "density": densities if len(set(densities)) > 1 else densities[0]}
    notes.append("ties with mergekit's conventions: per-tensor trimming to exactly "
                 "int(density * n) entries, + on cancelling entries, the weighted mean over "
                 "the agreeing models (scope=tensor trim=exact zero_sign=plus)")
    return {"method": "ties", "weights": weights, "alpha": alpha, "options": options}


def _scoremerge_method(method, models, shared, where):
    """One of scoremerge's own methods named in a mergekit config."""
    options = dict(shared)
    alpha = finite_number(options.pop("lambda", 1.0), f"{where}: parameters.lambda")
    out = {"method": method, "alpha": alpha, "options": options}
    given = [params.get("weight") for _, params in models]
    for i, (_, params) in enumerate(models):
        for name in params:
            if name != "weight":
                raise MergeInputError(f"{where}: models[{i}].parameters: {shown(name)}: "
                                      f"scoremerge's {method} takes per-model weights only; give "
                                      "its options in the top-level `parameters`")
    if any(w is not None for w in given):
        out["weights"] = [finite_number(1.0 if w is None else w,
                                        f"{where}: models[{i}].parameters.weight")
                          for i, w in enumerate(given)]
    return out


def _dtypes(data, where, notes):
    """dtype (mergekit's compute dtype) and out_dtype; scoremerge computes in float32 or
    float64 and writes the base's dtypes."""
    out = {}
    dtype = data.get("dtype")
    if dtype in COMPUTE_DTYPES:
        out["dtype"] = dtype
    elif dtype in HALF_DTYPES:
        notes.append(f"dtype: {dtype}: computed in float32 (mergekit would compute in {dtype}; "
                     "float32 is closer to the exact result), written in the base's dtypes")
    elif dtype is not None:
        raise MergeInputError(f"{where}: dtype: {shown(dtype)} is not a dtype scoremerge computes "
                              f"in ({', '.join(COMPUTE_DTYPES + HALF_DTYPES)})")
    out_dtype = data.get("out_dtype")
    if out_dtype is not None:
        raise MergeInputError(f"{where}: out_dtype: scoremerge writes each tensor in the base "
                              "model's dtype; converting the output is not supported: remove "
                              "out_dtype (or convert the merged model afterwards)")
    return out


def _model_path(ref, where):
    """A local path from a mergekit model reference, or MergeInputError naming what it is."""
    if isinstance(ref, dict):
        model = ref.get("model")
        if set(ref) - {"model"} or not isinstance(model, dict) or set(model) != {"path"}:
            raise MergeInputError(f"{where}: only a plain model path is supported, got "
                                  f"{shown(ref)}")
        ref = model["path"]
    if not isinstance(ref, str) or not ref:
        raise MergeInputError(f"{where}: must be a model path, got {shown(ref)}")
    if "+" in ref:
        raise MergeInputError(f"{where}: {shown(ref)}: model+lora references are not supported; "
                              "merge the LoRA into its model first (or merge LoRA adapters of one "
                              "base with `scoremerge merge --experts ADAPTER_DIR ...`)")
    if "@" in ref:
        raise MergeInputError(f"{where}: {shown(ref)}: revisions are not supported; download "
                              "that revision and give its local folder")
    if not Path(ref).expanduser().exists():
        raise MergeInputError(f"{where}: {shown(ref)} is not a local path (relative paths are to "
                              "the current folder, as in mergekit); scoremerge reads local "
                              "checkpoints only: download a hub model first, e.g. `hf download "
                              "ID --local-dir DIR`, and give DIR")
    return ref


def _model_entry(entry, where):
    if not isinstance(entry, dict) or "model" not in entry:
        raise MergeInputError(f"{where}: must be a mapping {{model: PATH, parameters: {{...}}}}, "
                              f"got {shown(entry)}")
    for key in entry:
        if key not in ("model", "parameters"):
            raise MergeInputError(f"{where}: {shown(key)} is not read (an entry has model and "
                                  "parameters)")
    return _model_path(entry["model"], f"{where}.model"), \
        _parameters(entry.get("parameters"), f"{where}.parameters")


def _parameters(params, where):
    """{name: scalar}; gradients (lists) and filtered values (mappings) are refused by name."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise MergeInputError(f"{where}: must be a mapping of parameter names to values")
    for name, value in params.items():
        if isinstance(value, list):
            raise MergeInputError(f"{where}.{name}: gradients (lists of values across layers) "
                                  "are not supported; give one value")
        if isinstance(value, dict):
            raise MergeInputError(f"{where}.{name}: filtered values (`filter:`) are not "
                                  "supported; give one value for every tensor")
    return dict(params)
