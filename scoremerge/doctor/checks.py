"""The numeric checks of `scoremerge doctor`: every op on every backend that runs on the device
(cases.py's inputs), and one end-to-end merge per method through `auto`, each against the
plain-torch reference (scoremerge.ref) in float64, as a relative Frobenius error per output.

Bounds are earned on the same input from the reference's own error, never set by hand:
- float32 and bfloat16: twice the error of the plain-torch reference run at that precision (its
  result stored in the output's dtype the way the backend stores it: Triton's CPU interpreter
  truncates on a downcast where a GPU rounds to nearest), against the float64 reference. Never
  below the error of the float64 answer itself rounded to the output's dtype: no result in that
  dtype can be closer (the reference may be exact where a correct backend is not).
- float64: the float64 reference is the answer, so its own error e is measured twice over, and
  the larger taken: its disagreement with itself on the same problem posed another way
  (transposed, or summed in the other order), and its float32 error on the same input scaled
  by the ratio of unit roundoffs (rounding errors scale with it). The bound is 3e, times the
  growth the case declares (kappa for the float64 Gram route of the SVD and polar factor): 2e
  for the backend as above, plus e for the answer's own error (the triangle inequality).
"""
import math
import os
import time
from dataclasses import asdict, dataclass

import torch

from .. import ref
from ..api import merge_task_vectors, methods
from ..backend import BACKENDS, IMPLEMENTED, resolve, why_not
from .cases import CASES

SEED = 0
UNIT_ROUNDOFF = {dtype: torch.finfo(dtype).eps / 2 for dtype in (torch.float32, torch.float64)}


@dataclass
class Result:
    """One check: an op on a backend at a dtype (or a method's merge through auto)."""
    op: str
    backend: str
    dtype: str
    ok: bool
    error: float = None
    bound: float = None
    output: str = None          # the output tensor nearest its bound (or past it)
    note: str = None            # the exception, when the op raised
    seconds: float = 0.0

    def as_dict(self):
        return asdict(self)


def rel_err(x, answer):
    """Relative Frobenius error of x against answer, both taken to float64 on the CPU."""
    x, answer = x.detach().double().cpu(), answer.detach().double().cpu()
    scale = answer.norm()
    diff = (x - answer).norm()
    return (diff / scale).item() if scale > 0 else diff.item()


def availability(device):
    """{op: {backend: None or why not}} for the named backends, and {op: auto's choice}."""
    table = {op: {name: why_not(op, name, device) for name in BACKENDS if name != "auto"}
             for op in IMPLEMENTED}
    auto = {}
    for op in IMPLEMENTED:
        try:
            auto[op] = resolve(op, "auto", device)
        except Exception as e:                  # SCOREMERGE_BACKEND names one that cannot run
            auto[op] = f"error: {e}"
    return table, auto


def run_checks(device, on_result=None):
    """Every op on every backend available for it on device, at each dtype its case takes."""
    return _reported((check(case, name, dtype, device)
                      for op, case in CASES.items() for name in IMPLEMENTED[op]
                      if why_not(op, name, device) is None for dtype in case.dtypes), on_result)


def _reported(results, on_result):
    """The results of a generator as a list, each passed to on_result as soon as it exists."""
    done = []
    for result in results:
        done.append(result)
        if on_result:
            on_result(result)
    return done


def check(case, backend, dtype, device):
    """The worst output, by error over bound, across the case's shapes."""
    start = time.perf_counter()
    worst = (-1.0, None, None, None)
    try:
        for index, shape in enumerate(case.shapes):
            for item in _compare(case, shape, SEED + index, backend, dtype, device):
                ratio = _ratio(item[1], item[2])
                if ratio > worst[0]:
                    worst = (ratio, *item)
    except Exception as e:
        return Result(case.op, backend, _name(dtype), ok=False, note=_short(e),
                      seconds=time.perf_counter() - start)
    _, output, error, bound = worst
    return Result(case.op, backend, _name(dtype), ok=math.isfinite(error) and error <= bound,
                  error=error, bound=bound, output=output, seconds=time.perf_counter() - start)


def _compare(case, shape, seed, backend, dtype, device):
    """[(output name, error, bound)] for one input shape."""
    x = case.make(shape, dtype, torch.Generator().manual_seed(seed))
    answer = case.reference(_upcast(x))
    plain = case.reference(x)
    got = tuple(out.cpu() for out in case.call(_moved(x, device), backend))
    _same_layout(case, got, plain)
    if case.align:
        got = case.align(got, answer)
    if dtype == torch.float64:
        bounds = _float64_bounds(case, shape, seed, x, answer)
    else:
        bounds = _plain_bounds(case, x, plain, answer, truncating=_interpreted(backend))
    return [(name, rel_err(g, a), b) for name, g, a, b in zip(case.outputs, got, answer, bounds)]


def _same_layout(case, got, plain):
    """Every output there, in the reference's shape and dtype (a wrong shape could broadcast)."""
    if len(got) != len(plain):
        raise ValueError(f"{len(got)} outputs, the reference has {len(plain)}")
    for name, g, p in zip(case.outputs, got, plain):
        if g.shape != p.shape or g.dtype != p.dtype:
            raise ValueError(f"output {name} is {tuple(g.shape)} {g.dtype}, the reference's "
                             f"{tuple(p.shape)} {p.dtype}")


def _plain_bounds(case, x, plain, answer, truncating):
    if truncating and any(out.dtype == torch.bfloat16 for out in plain):
        wide = case.reference(x, out_dtype=torch.float32)
        plain = tuple(_truncated_bf16(w) if p.dtype == torch.bfloat16 else p
                      for p, w in zip(plain, wide))
    if case.align:
        plain = case.align(plain, answer)
    return [2 * max(rel_err(p, a), best_possible(a, p.dtype)) for p, a in zip(plain, answer)]


def _float64_bounds(case, shape, seed, x, answer):
    own = _float64_own_errors(case, shape, seed, x, answer)
    growth = case.growth(answer, x) if case.growth else 1.0
    return [3 * e * growth for e in own]


def _float64_own_errors(case, shape, seed, x, answer):
    """Per output, the larger of two measurements of the float64 reference's own error: its
    disagreement with itself on the mirrored problem, and the float32 reference's error on the
    same input scaled by the ratio of unit roundoffs. Either alone can come out near zero where
    the reference repeats its own rounding."""
    mirrored, back = case.mirror(x)
    again = back(case.reference(mirrored))
    x32 = case.make(shape, torch.float32, torch.Generator().manual_seed(seed))
    answer32 = case.reference(_upcast(x32))
    plain32 = (case.plain32 or case.reference)(x32)
    if case.align:
        again, plain32 = case.align(again, answer), case.align(plain32, answer32)
    scale = UNIT_ROUNDOFF[torch.float64] / UNIT_ROUNDOFF[torch.float32]
    return [max(rel_err(a2, a), rel_err(p, a32) * scale)
            for a2, a, p, a32 in zip(again, answer, plain32, answer32)]


def best_possible(answer, dtype):
    """The error of the answer rounded to dtype: the closest any result in dtype can come."""
    return rel_err(answer.to(dtype), answer)


def _ratio(error, bound):
    """error / bound, where an exact result under a zero bound (an exact reference) is 0."""
    if not math.isfinite(error):
        return math.inf
    return 0.0 if error == 0 else error / bound if bound > 0 else math.inf


def _truncated_bf16(x):
    """float32 -> bfloat16 by dropping the low 16 bits (rounding toward zero), as Triton's CPU
    interpreter casts."""
    bits = x.float().contiguous().view(torch.int32) & -65536
    return bits.view(torch.float32).to(torch.bfloat16)


def _interpreted(backend):
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _upcast(x):
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point()
                else torch.float64 if isinstance(v, torch.dtype) else v) for k, v in x.items()}


def _moved(x, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in x.items()}


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _short(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


# ---- end to end: one merge per method through auto ---------------------------------------------

# Tall, wide, square, odd sizes, two keys of one shape (batched together), vectors, and a 2-D key
# too thin for three tasks (the mean path for SCORE and TSV-M; Iso-C and Iso-CTS merge it
# isotropically).
MERGE_SHAPES = {"blocks.0.qkv": (45, 15), "blocks.1.qkv": (45, 15), "blocks.0.proj": (15, 15),
                "blocks.0.fc1": (29, 15), "blocks.0.fc2": (15, 29), "wide": (7, 33),
                "blocks.0.norm": (15,), "pos_embed": (2, 15), "head": (10, 15)}
MERGE_TASKS = 3


def merge_task_vectors_for_check(seed=SEED):
    g = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(*s, generator=g, dtype=torch.float64).float()
             for k, s in MERGE_SHAPES.items()} for _ in range(MERGE_TASKS)]


def run_merge_checks(device, on_result=None):
    """Each registered method, float32 through backend="auto" on device, against the per-key
    reference in float64 on the same task vectors; the error is over the whole merged model."""
    tvs = merge_task_vectors_for_check()
    wide = [{k: v.double() for k, v in tv.items()} for tv in tvs]
    # linear (on_models) merges models, not task vectors: tests/test_weights.py covers it
    return _reported((_merge_check(method, tvs, wide, device)
                      for method, spec in methods().items() if not spec.on_models), on_result)


def _merge_check(method, tvs, wide, device):
    start = time.perf_counter()
    try:
        answer = ref.merge_task_vectors(wide, method)
        plain = ref.merge_task_vectors(tvs, method)
        got = merge_task_vectors(tvs, method, backend="auto", device=device)
        rounded = {k: v.float() for k, v in answer.items()}
        error, bound = _model_err(got, answer), 2 * max(_model_err(plain, answer),
                                                        _model_err(rounded, answer))
    except Exception as e:
        return Result(method, "auto", "float32", ok=False, note=_short(e),
                      seconds=time.perf_counter() - start)
    return Result(method, "auto", "float32", ok=math.isfinite(error) and error <= bound,
                  error=error, bound=bound, output="model", seconds=time.perf_counter() - start)


def _model_err(got, answer):
    """Relative Frobenius error over all keys at once (the model as one vector)."""
    diff = sum(((got[k].double().cpu() - answer[k]) ** 2).sum().item() for k in answer)
    norm = sum((answer[k] ** 2).sum().item() for k in answer)
    return math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)
