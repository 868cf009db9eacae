"""The public API: task_vectors, merge_task_vectors, merge, methods."""
import functools
import math

import torch
from tqdm.auto import tqdm

from . import ref
from .backend import requested
from .errors import MergeInputError, shown
from .methods import all_methods, get
from .methods.elementwise import per_task
from .methods.entrywise import CPU_CHUNK, Fused, key_job, plus, run_jobs
from .methods.routing import excluded, shape_groups
from .parallel import parallel_map, thread_shares
from .validate import (all_finite, check_device, check_models, exclude_patterns, finite_number,
                       overflow_error)

COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def methods():
    """Every registered method by name: kind, summary, paper, and its options with defaults
    (`methods()["ties"].defaults["density"] == 0.2`)."""
    return all_methods()


def task_vectors(base, experts):
    """tau_t = expert_t - base for every floating-point key, in float32 or wider (a bf16 or fp16
    difference would round away most of a fine-tuning update). Integer keys are left out."""
    experts = list(experts)
    _check_base_and_experts(base, experts)
    return _task_vectors(base, experts)


def merge_task_vectors(task_vectors, method="score", *, weights=None, exclude=(), backend="auto",
                       device=None, dtype=None, progress=False, allow_nonfinite=False, **options):
    """Merge T task vectors (dicts key -> float tensor, same keys and shapes) into one.

    method: a name from methods(); options: that method's options (methods()[name].defaults).
    weights: one number per task vector (default all 1). mean: sum_t w_t tau_t / sum_t w_t;
    TIES: each task's kept values scaled by w_t, the disjoint mean weighted; every other method
    merges the scaled task vectors w_t tau_t (the SVD methods decompose them scaled).
    exclude: regular expressions; matching keys take the mean path (docs/algorithms.md).
    backend: auto | cuda | triton | torch, or "reference" for scoremerge.ref's per-key loops.
    device: where to compute (inputs may live anywhere); results come back on the inputs' device.
    dtype: compute dtype, float32 (default) or float64 (default when any input is float64).
    allow_nonfinite: return a merged value that is Inf in its dtype instead of raising.
    Returns {key: merged task vector}, each key in its input dtype.

    >>> tau = merge_task_vectors([tv1, tv2, tv3], "score", variant="diag")
    """
    tvs = list(task_vectors)
    spec, opts = checked_method(method, options, len(tvs))
    if spec.on_models:
        raise MergeInputError(f"method {method!r} merges the experts' weights, not task vectors: "
                              "use merge()")
    weights = checked_weights(weights, len(tvs), spec, opts)
    check_models(tvs, [f"task vector {i}" for i in range(len(tvs))], floating_only=True)
    merged = _merge(tvs, spec, opts, exclude_patterns(exclude), backend, device, dtype, progress,
                    weights)
    return merged if allow_nonfinite else _finite(merged, "task vector")


def merge(base, experts, method="score", *, weights=None, alpha=1.0, exclude=(), backend="auto",
          device=None, dtype=None, progress=False, allow_nonfinite=False, **options):
    """The merged model base + alpha * merge_task_vectors(task_vectors(base, experts), ...).

    Floating-point keys come back in the base's dtype; other keys are copied from the base. A
    merged value that is not finite in the base's dtype (an fp16 base whose update overflows
    it) raises MergeInputError naming the key, unless allow_nonfinite. weights: one number per
    expert, as merge_task_vectors takes them (linear: the weighted average of the experts).

    >>> merged = merge(base, [expert1, expert2, expert3], "score", alpha=1.0)
    >>> merged = merge(base, [math, code], "ties", weights=[0.7, 0.3], density=[0.5, 0.3])
    """
    experts = list(experts)
    _require_experts(experts)                 # before the method, so the message says what is missing
    spec, opts = checked_method(method, options, len(experts))
    weights = checked_weights(weights, len(experts), spec, opts)
    _check_base_and_experts(base, experts)
    return merge_checked(base, experts, spec, opts, weights=weights, alpha=checked_alpha(alpha),
                         exclude=exclude_patterns(exclude), backend=backend, device=device,
                         dtype=dtype, progress=progress, allow_nonfinite=allow_nonfinite)


def merge_checked(base, experts, spec, opts, *, alpha, exclude, weights=None, backend="auto",
                  device=None, dtype=None, progress=False, allow_nonfinite=False, names=None,
                  ranked=None):
    """merge() for callers that have checked everything merge() checks (the CLI, each batch of
    a streaming merge): spec and opts from checked_method, weights from checked_weights, alpha
    from checked_alpha, exclude from exclude_patterns, the models' keys, shapes and integer keys
    by check_models. For an
    entrywise method the models' values need no check of their own (methods.entrywise says
    why); otherwise they must have passed check_models' NaN/Inf scan. names: the base's and
    each expert's, for messages. ranked: (ranking, start) when the models hold the entries
    start.. of one key that a method with in_spans has ranked whole (a streaming merge's span)."""
    names = names or ["the base"] + [f"expert {i}" for i in range(len(experts))]
    if spec.on_models and alpha != 1:
        raise MergeInputError(f"method {spec.name!r} averages the experts' weights themselves; "
                              f"alpha does not apply (got {alpha})")
    if spec.entrywise and backend != "reference":
        return _merge_entrywise(base, experts, spec, opts, weights, alpha, exclude, device, dtype,
                                allow_nonfinite, names, progress)
    if ranked is not None:
        out = _merge_ranked(base, experts, spec, opts, ranked, weights, alpha, device, dtype)
    elif spec.on_models:
        out = _merge_models(base, experts, spec, opts, weights, exclude, device, dtype)
    else:
        taus = _merge(_task_vectors(base, experts), spec, opts, exclude, backend, device, dtype,
                      progress, weights, owned=True)
        out = {}
        for key, b in base.items():
            if key in taus:
                out[key] = plus(b.to(taus[key].dtype), taus[key], alpha).to(b.dtype)
            else:
                out[key] = b.clone()
    return out if allow_nonfinite else _finite(out, "merged model")


def _merge_models(base, experts, spec, opts, weights, exclude, device, dtype):
    """merge_checked for a method over the experts' weights (spec.on_models) by the reference
    (the fast path is _merge_entrywise's): per key, in the compute dtype, the excluded keys the
    plain mean of the experts."""
    cdtype = compute_dtype(dtype, any(x.dtype == torch.float64 for m in (base, *experts)
                                       for x in m.values()))
    device = check_device(device) if device is not None else None
    given = {} if weights is None else {"weights": weights}
    out = {}
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = b.clone()
            continue
        x = torch.stack([e[key].to(device=device or b.device, dtype=cdtype) for e in experts])
        merged = x.mean(dim=0) if excluded(key, exclude) else \
            getattr(ref.methods, spec.name)(list(x), **opts, **given)
        out[key] = merged.to(device=b.device, dtype=b.dtype)
    return out


def checked_weights(weights, n_experts, spec, opts):
    """The per-expert weights as a tuple of floats (None stays None), or MergeInputError: one
    finite number per expert, and a non-zero sum where the method divides by it."""
    if weights is None:
        return None
    try:
        weights = tuple(weights)
    except TypeError:
        raise MergeInputError(f"weights must be a list of numbers, got {shown(weights)}") from None
    if len(weights) != n_experts:
        raise MergeInputError(f"weights: one per expert: {n_experts} expert(s), "
                              f"{len(weights)} weight(s)")
    weights = tuple(finite_number(w, f"weights[{i}]") for i, w in enumerate(weights))
    divides = spec.name == "mean" or (spec.name == "linear" and opts.get("normalize"))
    if divides and sum(weights) == 0:
        raise MergeInputError(f"weights sum to 0, and {spec.name} divides by their sum")
    return weights


def _weight_tensor(weights, like):
    return torch.tensor(weights, dtype=like.dtype, device=like.device)


def _scaled_by_task(x, weights, in_place=False):
    """x [T, ...] with task t's entries times weights[t] (in x itself with in_place)."""
    w = per_task(_weight_tensor(weights, x), x)
    return x.mul_(w) if in_place else x * w


def _merge_entrywise(base, experts, spec, opts, weights, alpha, exclude, device, dtype,
                     allow_nonfinite, names, progress):
    """merge_checked for an entrywise method: every key in chunks (methods.entrywise), the
    entries of all keys spread over the CPU threads together."""
    floating = [b for b in base.values() if b.is_floating_point()]
    cdtype = compute_dtype(dtype, any(x.dtype == torch.float64 for m in (base, *experts)
                                       for x in m.values()))
    home = floating[0].device if floating else torch.device("cpu")
    device = check_device(device) if device is not None else home
    out, jobs = {}, []
    fused = _fused(spec, opts, weights, alpha, len(experts)) \
        if cdtype == torch.float32 and device.type == "cpu" else None
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = b.clone()
            continue
        is_excluded = excluded(key, exclude)
        out[key], job = key_job(key, b, [e[key] for e in experts],
                                _entrywise_fn(key, spec, opts, weights, is_excluded),
                                alpha=alpha, on_models=spec.on_models, compute_dtype=cdtype,
                                device=device, names=names, allow_nonfinite=allow_nonfinite,
                                fused=None if is_excluded else fused)
        jobs.append(job)
    with tqdm(total=sum(b.numel() for b in floating), desc=f"merge ({spec.name})", unit="entry",
              unit_scale=True, disable=not progress) as bar:
        run_jobs(jobs, device, on_span=bar.update if progress else None)
    return out


# torch's sum over the task dim accumulates task by task from +0 (the kernel's order) for up to
# four tasks; past that it often rounds differently (measured on torch 2.13), so task arithmetic
# with more experts keeps the torch path. linear accumulates in scoremerge's own loop: any T.
_FUSED_SUM_MAX_TASKS = 4


def _fused(spec, opts, weights, alpha, n_experts):
    """The compiled one-pass form (methods.entrywise.Fused) of this merge, or None: task
    arithmetic (up to four experts) and linear, where a probe finds the kernel's bits equal to
    the torch path's."""
    if spec.name == "task_arithmetic" and n_experts <= _FUSED_SUM_MAX_TASKS:
        plan = Fused("task_arithmetic", weights)
    elif spec.name == "linear":
        w = torch.tensor(weights or (1.0,) * n_experts, dtype=torch.float32)
        plan = Fused("linear", tuple(w.tolist()), float(w.sum()) if opts["normalize"] else 1.0)
    else:
        return None
    return plan if _fused_agrees(spec.name, plan, alpha, n_experts, opts.get("normalize")) \
        else None


@functools.cache
def _fused_agrees(method, plan, alpha, n_experts, normalize):
    """Whether the compiled kernel reproduces the torch path (the same key_job without it) to
    the bit on a probe: odd length, signed zeros, tasks that cancel, magnitudes over 1e-30..1e30.
    What it guards: the kernel's order of accumulation against torch's, which torch does not
    promise (its sum over the task dim accumulates task by task from +0 only for small T)."""
    g = torch.Generator().manual_seed(0)
    n = 4099
    scale = torch.logspace(-30, 30, n).float()
    base = torch.randn(n, generator=g) * scale
    base[:64] = torch.tensor([0.0, -0.0] * 32)
    # per entry and task, sizes over six orders of magnitude: any other order of the sum
    # rounds differently somewhere
    experts = [base + torch.randn(n, generator=g) * scale
               * 10 ** (6 * torch.rand(n, generator=g) - 3) for _ in range(n_experts)]
    experts[0][64:128] = base[64:128]                     # a task vector of exact zeros
    if n_experts > 1:
        experts[1][128:192] = -experts[0][128:192]        # tasks that cancel
    spec, opts = get(method), {} if normalize is None else {"normalize": normalize}
    outs = []
    for fused in (None, plan):
        out, job = key_job("probe", base, experts, _entrywise_fn("probe", spec, opts,
                                                                 plan.weights, False),
                           alpha=alpha, on_models=spec.on_models, compute_dtype=torch.float32,
                           device=base.device, names=["base"] + ["expert"] * n_experts,
                           allow_nonfinite=True, fused=fused)
        if fused is not None and job.fused is None:
            return False                                  # the module is not there
        run_jobs([job], base.device)
        outs.append(out.view(torch.int32))
    return torch.equal(*outs)


def _entrywise_fn(key, spec, opts, weights, is_excluded):
    """The merge of one chunk x [T, L] of task vectors for methods.entrywise, with the weights
    applied as _merge applies them."""
    def fn(x):
        if is_excluded and spec.on_models:
            return x.mean(dim=0)                 # the models' plain mean
        if weights is not None and not (spec.weighted and not is_excluded):
            x = _scaled_by_task(x, weights, in_place=True)      # x is the job's scratch
        if is_excluded:
            return x.mean(dim=0)
        if weights is not None and spec.weighted:
            return spec.fn({key: x}, weights=_weight_tensor(weights, x), **opts)[key]
        return spec.fn({key: x}, **opts)[key]
    return fn


def checked_alpha(alpha):
    """alpha as a finite float, or MergeInputError."""
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise MergeInputError(f"alpha must be a number, got {shown(alpha)}") from None
    if not math.isfinite(alpha):
        raise MergeInputError(f"alpha must be finite, got {alpha}")
    return alpha


def _finite(tensors, what):
    """The tensors, once every floating one is finite: inputs were checked, so Inf here is an
    update that overflowed the output dtype (or a method's own failure), never written silently."""
    for key, x in tensors.items():
        if x.is_floating_point() and not all_finite(x):
            raise overflow_error(key, x, what)
    return tensors


def _require_experts(experts):
    if not experts:
        raise MergeInputError("no experts given: merging needs at least one fine-tuned model")


def _check_base_and_experts(base, experts):
    _require_experts(experts)
    check_models([base] + experts, ["the base"] + [f"expert {i}" for i in range(len(experts))])


def _task_vectors(base, experts):
    out = [{} for _ in experts]
    for key, b in base.items():
        if not b.is_floating_point():
            continue
        for tv, expert in zip(out, experts):
            dtype = _tau_dtype(b, expert[key])
            tv[key] = expert[key].to(dtype) - b.to(device=expert[key].device, dtype=dtype)
    return out


def _tau_dtype(base, expert):
    """The dtype of expert - base as a task vector: float32 or wider."""
    return torch.promote_types(torch.promote_types(base.dtype, expert.dtype), torch.float32)


def _merge_ranked(base, experts, spec, opts, ranked, weights, alpha, device, dtype):
    """{key: merged values} of merge_checked's `ranked` span, with the arithmetic of the whole
    key's merge (the task vectors stacked in the compute dtype, the merged task vector stored in
    the first task vector's dtype, then base + alpha * it in the base's dtype), in chunks across
    the CPU threads: no [T, L] copy of the span is held."""
    (key, b), = base.items()
    es = [e[key] for e in experts]
    cdtype = compute_dtype(dtype, any(x.dtype == torch.float64 for x in (b, *es)))
    device = check_device(device) if device is not None else b.device
    w = None if weights is None else torch.tensor(weights, dtype=cdtype, device=device)
    stored = _tau_dtype(b, es[0])
    ranking, start = ranked
    out = torch.empty_like(b)

    def run(share, chunk):
        taus = torch.empty(len(es), min(chunk, share[1] - share[0]), dtype=cdtype, device=device)
        for lo in range(share[0], share[1], chunk):
            hi = min(share[1], lo + chunk)
            x = stacked_task_vectors(b[lo:hi], [e[lo:hi] for e in es], cdtype, device,
                                     out=taus[:, :hi - lo])
            tau = spec.in_spans.merge({key: x}, ranking, start + lo, opts, weights=w)[key]
            tau = tau.to(device=b.device, dtype=stored)
            out[lo:hi] = plus(b[lo:hi].to(stored), tau, alpha)      # cast to the base's dtype

    n = b.numel()
    if b.device.type == "cpu" and device.type == "cpu":
        parallel_map(lambda share: run(share, CPU_CHUNK), thread_shares(n, CPU_CHUNK))
    elif n:
        run((0, n), n)
    return {key: out}


def stacked_task_vectors(base, experts, dtype, device, out=None):
    """[T, *shape]: one key's task vectors as a merge stacks them (each difference in float32 or
    wider, then in the compute dtype on device); base and experts are its tensors. out: where
    to write them (a [T, *shape] tensor of dtype on device)."""
    if out is None:
        out = torch.empty(len(experts), *base.shape, dtype=dtype, device=device)
    for tau, expert in zip(out, experts):
        diff = _tau_dtype(base, expert)
        if diff == dtype and base.device == device == expert.device:
            torch.sub(expert.to(diff), base.to(diff), out=tau)     # _task_vectors' arithmetic
        else:
            tau.copy_(_task_vectors({"": base}, [{"": expert}])[0][""])
    return out


def checked_method(method, options, n_tasks):
    """(the registered method, its options parsed with defaults filled in), or MergeInputError."""
    spec = get(method)
    opts = spec.parse_options(options, n_tasks)
    if n_tasks < spec.min_tasks:
        raise MergeInputError(f"method {method!r} needs at least {spec.min_tasks} expert(s) / task "
                              f"vector(s), got {n_tasks}")
    return spec, opts


def compute_dtype(dtype, wide):
    """float32 unless asked otherwise, or float64 when any input is (`wide`)."""
    if dtype is None:
        return torch.float64 if wide else torch.float32
    resolved = COMPUTE_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in COMPUTE_DTYPES.values():
        raise MergeInputError(f"compute dtype must be float32 or float64, got {shown(dtype)}")
    return resolved


def _merge(tvs, spec, opts, exclude, backend, device, dtype, progress, weights=None,
           owned=False):
    """Merge validated task vectors: matrix groups batched by shape, the rest per the method,
    and every key the method leaves by the mean path; the weights as merge_task_vectors
    defines them. owned: tvs were made for this merge (not the caller's), so each key's task
    vectors are dropped from them once stacked."""
    stack = _Stack(tvs, weights, device, dtype, owned)
    if backend == "reference":
        merged = ref.merge_task_vectors(
            [{k: tv[k].to(stack.device, stack.dtype) for k in stack.keys} for tv in tvs],
            spec.name, exclude=exclude, weights=weights, **opts)
        for key in stack.keys:
            stack.store(key, merged[key])
        return stack.result()
    bar = tqdm(total=len(stack.keys), desc=f"merge ({spec.name})", unit="key",
               disable=not progress)
    by_kind = _merge_matrix_keys if spec.kind == "matrix" else _merge_elementwise_keys
    by_kind(stack, spec, opts, exclude, requested(backend), bar)
    for key in stack.keys:
        if key not in stack.out:
            stack.store(key, stack.stacked(key).mean(dim=0))
            bar.update(1)
    bar.close()
    return stack.result()


class _Stack:
    """One merge's validated task vectors, stacked key by key on the compute device in the
    compute dtype (scaled by the weights, unless the method takes them itself), and the merged
    keys, stored back in each key's dtype on the inputs' device. owned: the task vectors are
    this merge's own, and a key's are dropped once copied into a stack or a sum, so a merge
    holds them about once, not twice (each key is stacked once)."""

    def __init__(self, tvs, weights, device, dtype, owned=False):
        self.tvs, self.weights, self.keys, self.out = tvs, weights, list(tvs[0]), {}
        self.owned, self.dtypes = owned, {key: tvs[0][key].dtype for key in self.keys}
        self.home = next(iter(tvs[0].values())).device if tvs[0] else torch.device("cpu")
        self.device = check_device(device) if device is not None else self.home
        self.dtype = compute_dtype(dtype, any(x.dtype == torch.float64
                                              for tv in tvs for x in tv.values()))

    def stacked(self, key, scaled=True):
        return self.stacked_group([key], scaled)[0]

    def stacked_group(self, keys, scaled=True):
        """[len(keys), T, *shape] for same-shape keys, in one copy (scaled in place)."""
        x = torch.stack([tv[key].to(device=self.device, dtype=self.dtype)
                         for key in keys for tv in self.tvs])
        x = x.view(len(keys), len(self.tvs), *x.shape[1:])
        if scaled and self.weights is not None:
            _scaled_by_task(x.transpose(0, 1), self.weights, in_place=True)
        self._release(keys)
        return x

    def summed_group(self, keys):
        """[len(keys), 1, *shape]: each key's (weighted) task sum, accumulated task by task in
        the reference's order; no [T, ...] copy (at T = 8 the copies took a third of Iso-C)."""
        first = self.tvs[0][keys[0]]
        x = torch.empty(len(keys), 1, *first.shape, device=self.device, dtype=self.dtype)
        w = self.weights or [1.0] * len(self.tvs)
        for acc, key in zip(x[:, 0], keys):
            acc.copy_(self.tvs[0][key])
            if w[0] != 1.0:
                acc.mul_(w[0])
            for tv, w_t in zip(self.tvs[1:], w[1:]):
                acc.add_(tv[key].to(device=self.device, dtype=self.dtype), alpha=w_t)
        self._release(keys)
        return x

    def _release(self, keys):
        if self.owned:
            for tv in self.tvs:
                for key in keys:
                    del tv[key]

    def store(self, key, value):
        self.out[key] = value.to(device=self.home, dtype=self.dtypes[key])

    def result(self):
        return {key: self.out[key] for key in self.keys}


def _merge_matrix_keys(stack, spec, opts, exclude, backend, bar):
    """The matrix-path keys, in same-shape groups, one group per CPU thread on a CPU."""
    shapes = {k: tuple(stack.tvs[0][k].shape) for k in stack.keys}
    on_cpu = stack.device.type == "cpu"
    groups = shape_groups(shapes, len(stack.tvs), exclude, stack.dtype.itemsize,
                          min_chunks=torch.get_num_threads() if on_cpu else 1, method=spec.name)

    def merge_group(group):
        tau = stack.summed_group(group) if spec.on_task_sum else stack.stacked_group(group)
        merged = spec.fn(tau, backend=backend, **opts)
        for key, value in zip(group, merged):
            stack.store(key, value)
        bar.update(len(group))

    if on_cpu:
        parallel_map(merge_group, groups)
    else:
        for group in groups:
            merge_group(group)


def _merge_elementwise_keys(stack, spec, opts, exclude, backend, bar):
    """Every key not excluded, by the method's one rule over all of them at once."""
    chosen = [k for k in stack.keys if not excluded(k, exclude)]
    given = {"weights": torch.tensor(stack.weights, dtype=stack.dtype, device=stack.device)} \
        if spec.weighted and stack.weights is not None else {}
    merged = spec.fn({k: stack.stacked(k, scaled=not given) for k in chosen}, **opts, **given)
    for key, value in merged.items():
        stack.store(key, value)
    bar.update(len(chosen))
