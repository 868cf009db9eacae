"""Entry-wise merges, key by key in chunks: for a method whose merged entry depends only on the
same entry of the task vectors (mean, task arithmetic, MagMax), the task vectors are formed,
merged, added to the base and cast back a chunk at a time in a few reused buffers. A key then
costs one read of its inputs and one write of its output, in memory of a few chunks, however
large the key.

No input needs a separate NaN/Inf pass either: a NaN or Inf in the base or an expert reaches
the merged entry (a sum, a mean and the entry of largest magnitude all carry it, and so does
base + alpha * that), so the one finite check of each output chunk covers the inputs; only when
it fails are the inputs scanned, to name the model at fault.

The arithmetic is api.merge's, step for step and in the same dtypes, so the result is the same
to the bit as merging the whole key at once.
"""
import bisect
from typing import NamedTuple

import torch

from ..backend.cpu import extension as cpu_extension
from ..errors import MergeInputError, shown
from ..parallel import parallel_map
from ..validate import all_finite, overflow_error

# Entries per chunk. Fewer, larger chunks win over L2-sized ones: per chunk each of two threads
# issues about T + 6 small ops, and their dispatch (and the threads' hand-offs of the GIL) cost
# more than the cache misses saved. Task arithmetic over a 7M-entry key on the 2-core machine:
# T = 3: 64K 40.8 ms, 128K 31.5, 256K 26.8, 512K 23.8; T = 8: 64.3, 49.3, 44.0, 45.6 (MagMax
# flat within 10%); so 256K, where neither T loses.
CPU_CHUNK = 1 << 18


class Fused(NamedTuple):
    """A job's merge as one pass of scoremerge._cpu (csrc/cpu/entrywise.cpp) on float32 CPU
    tensors, where the caller has checked that the kernel reproduces the torch path's bits.
    kind: "task_arithmetic" (base + alpha * sum_t w_t (e_t - b)) or "linear" (sum_t w_t e_t /
    divisor); weights: a tuple, or None for task arithmetic's plain sum; divisor: linear's
    (1.0: none)."""
    kind: str
    weights: tuple = None
    divisor: float = 1.0


def merge_key(key, base, experts, merge_fn, *, alpha, compute_dtype, device, names,
              allow_nonfinite=False, on_models=False, fused=None):
    """base + alpha * merge_fn(stacked task vectors [T, L]) for one key, in base's dtype and
    on base's device. merge_fn maps [T, L] to [L] entry-wise. names: base's and each expert's,
    for messages. allow_nonfinite: an entry the update overflows is written as Inf (a NaN or
    Inf input is refused all the same). on_models: merge_fn takes the experts' values
    themselves and its result is the merged value (alpha must be 1)."""
    out, job = key_job(key, base, experts, merge_fn, alpha=alpha, compute_dtype=compute_dtype,
                       device=device, names=names, allow_nonfinite=allow_nonfinite,
                       on_models=on_models, fused=fused)
    run_jobs([job], device)
    return out


def key_job(key, base, experts, merge_fn, *, alpha, compute_dtype, device, names,
            allow_nonfinite=False, on_models=False, fused=None):
    """(an empty output like base, the _Job that fills it): merge_key's arguments, for
    run_jobs to run with other keys' jobs. fused: the same merge as a Fused kernel call, taken
    where the tensors allow it (float32, contiguous, on the CPU), else merge_fn's torch path."""
    tau_dtype = torch.promote_types(torch.float32, base.dtype)
    for e in experts:
        tau_dtype = torch.promote_types(tau_dtype, e.dtype)
    out = torch.empty_like(base)
    job = _Job(key, base.reshape(-1), [e.reshape(-1) for e in experts], out.view(-1), merge_fn,
               alpha, compute_dtype, tau_dtype, device, names, allow_nonfinite, on_models)
    if fused is not None and _fusable(job):
        job.fused = fused
    return out, job


def run_jobs(jobs, device, on_span=None):
    """Run every job over all its entries. On a CPU the entries of all the jobs together are
    cut into one contiguous share per thread (one intra-op thread each), in key order: a
    model's many small keys no longer pay a thread hand-off each, and a share starts and ends
    anywhere inside a key (2-layer ViT-B, 39 keys, T = 8: 0.12-0.15 -> 0.10 s, the same bits).
    A share smaller than a chunk is not worth a thread. on_span(entries): called as each span
    is done (a progress bar)."""
    if device.type != "cpu":
        for job in jobs:
            n = job.base.numel()
            if n:
                job.run(0, n, n)
            if on_span:
                on_span(n)
        return
    total = sum(job.base.numel() for job in jobs)
    shares = min(torch.get_num_threads(), -(-total // CPU_CHUNK)) or 1
    bounds = [total * s // shares for s in range(shares + 1)]   # share s: [bounds[s], bounds[s+1])
    plans, at = [[] for _ in range(shares)], 0
    for job in jobs:
        n, lo = job.base.numel(), 0
        while lo < n:
            s = bisect.bisect_right(bounds, at) - 1
            hi = min(n, lo + bounds[s + 1] - at)
            plans[s].append((job, lo, hi))
            at, lo = at + hi - lo, hi

    def run(plan):
        for job, lo, hi in plan:
            job.run(lo, hi, CPU_CHUNK)
            if on_span:
                on_span(hi - lo)
    parallel_map(run, plans)


class _Job:
    """One key's inputs, output and settings; run(start, stop, chunk) merges that span."""

    def __init__(self, key, base, experts, out, merge_fn, alpha, compute_dtype, tau_dtype,
                 device, names, allow_nonfinite, on_models):
        self.key, self.base, self.experts, self.out = key, base, experts, out
        self.merge_fn, self.alpha, self.names = merge_fn, alpha, names
        self.compute_dtype, self.tau_dtype, self.device = compute_dtype, tau_dtype, device
        self.allow_nonfinite, self.on_models = allow_nonfinite, on_models
        self.fused = None

    def run(self, start, stop, chunk):
        if self.fused is not None:
            return self._run_fused(start, stop)
        # The base is read in place, and the merged chunk written straight into the output,
        # wherever no cast is needed: each copy saved is a pass over the chunk.
        direct_base = self.base.dtype == self.tau_dtype and self.base.device == self.device
        direct_out = self.out.dtype == self.tau_dtype and self.out.device == self.device
        b_buf = None if direct_base or self.on_models else \
            torch.empty(chunk, dtype=self.tau_dtype, device=self.device)
        taus = torch.empty(len(self.experts), chunk, dtype=self.tau_dtype, device=self.device)
        for lo in range(start, stop, chunk):
            hi = min(stop, lo + chunk)
            if self.on_models:
                for t, e in enumerate(self.experts):
                    taus[t, :hi - lo].copy_(e[lo:hi])
            else:
                b = self.base[lo:hi] if direct_base else b_buf[:hi - lo].copy_(self.base[lo:hi])
                for t, e in enumerate(self.experts):
                    torch.sub(e[lo:hi].to(self.device), b, out=taus[t, :hi - lo])
            x = taus[:, :hi - lo]
            if self.compute_dtype != self.tau_dtype:
                x = x.to(self.compute_dtype)
            merged = self.merge_fn(x).to(self.tau_dtype)      # x is scratch: fn may write it
            in_place = direct_out and not self.on_models
            if self.on_models:
                result = merged.to(self.out.dtype)
            elif in_place:
                result = plus(b, merged, self.alpha, out=self.out[lo:hi])
            else:
                result = plus(b, merged, self.alpha).to(self.out.dtype)
            if not all_finite(result):         # after the cast: it may overflow the dtype
                _check_inputs(self.key, lo, hi, self.base, self.experts, self.names,
                              self.on_models)
                if not self.allow_nonfinite:
                    raise overflow_error(self.key, result, "merged model")
            if not in_place:
                self.out[lo:hi].copy_(result)

    def _run_fused(self, start, stop):
        """[start, stop) in one call of the compiled kernel (no chunks: it streams itself)."""
        _cpu = cpu_extension()[0]
        experts = [e[start:].data_ptr() for e in self.experts]
        out = self.out[start:].data_ptr()
        kind, weights, divisor = self.fused
        if kind == "task_arithmetic":
            bad = _cpu.task_arithmetic(self.base[start:].data_ptr(), experts, list(weights or ()),
                                       self.alpha, out, stop - start)
        else:
            bad = _cpu.linear(experts, list(weights), divisor, out, stop - start)
        if bad:
            _check_inputs(self.key, start, stop, self.base, self.experts, self.names,
                          self.on_models)
            if not self.allow_nonfinite:
                raise overflow_error(self.key, self.out[start:stop], "merged model")


def _fusable(job):
    """Whether the compiled kernels can take this job: every tensor float32, contiguous and on
    the CPU, computed in float32, the module built."""
    tensors = [job.base, *job.experts, job.out]
    return job.device.type == "cpu" and job.compute_dtype == torch.float32 and \
        all(t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
            for t in tensors) and cpu_extension()[0] is not None


def plus(base, tau, alpha, out=None):
    """base + alpha * tau, rounded twice (the product, then the sum) as mergekit and FusionBench
    compute it, so that their results are met to the bit; alpha = 1 multiplies nothing. With
    out, tau is scaled in place and the sum written to out."""
    if out is None:
        return base + (tau if alpha == 1 else tau * alpha)
    return torch.add(base, tau if alpha == 1 else tau.mul_(alpha), out=out)


def _check_inputs(key, start, stop, base, experts, names, on_models=False):
    """Name the input whose entries [start, stop) hold a NaN or Inf (the base only where it
    is merged: a method on the models themselves merges the experts alone)."""
    models = zip(experts, names[1:]) if on_models else zip((base, *experts), names)
    for x, name in models:
        part = x.reshape(-1)[start:stop]
        if not all_finite(part):
            bad = "NaN" if torch.isnan(part).any() else "Inf"
            raise MergeInputError(f"key {shown(key)} of {name} contains {bad}")
