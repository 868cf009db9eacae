"""Batched truncated SVD and polar factor on a GPU: ops.truncated_svd / ops.polar with
backend="cuda" against the alternatives, same process, same inputs; then end-to-end SCORE merges.
Skipped without CUDA.

    python -m pytest bench/test_svd_gpu.py -s

Truncated SVD: batches of task-vector-like fp32 matrices (low rank plus noise, scale 1e-3): 60 of
768x768, 3072x768 and 768x3072 (a ViT-B with T = 5: 12 blocks x 5 tasks) and 8 of 4096x4096 and
11008x4096 (7B-LLM layers); k = min(m, n) // T for T in {2, 4, 6}. Contenders:
  cuda          ops.truncated_svd(backend="cuda"): float64 Gram matrices + cuSOLVER's batched
                eigensolver (the new path)
  torch         ops.truncated_svd(backend="torch"): the same with torch.linalg.eigh
  svd, svd_loop torch.linalg.svd, default driver, full_matrices=False (then truncated to k, a
                view): one batched call (torch loops inside) / a Python loop over the matrices
  gesvda, gesvda_loop   the same with driver="gesvda"
  svd_lowrank   torch.svd_lowrank(q=k+10, niter) at equal accuracy: niter is the smallest of
                1, 2, 4, 8, 16 whose singular-value error is within 2x of cuda's (row
                "svd_lowrank"); if none is, within the search's time, the row says
                "not reached" and is timed at the last niter tried. The smallest niter meeting the
                issue's 1e-5 is timed too where it differs (row "svd_lowrank_1e-5").
  cupy          cupy.linalg.svd(full_matrices=False) on the same memory through DLPack (the
                zero-copy conversion is outside the timing); skipped where CuPy does not import
The full SVDs do not depend on k: they are timed once per shape and their error taken per k. On
the LLM shapes the batched calls are left out (torch loops inside: the same as the loop), and
torch and svd_lowrank run at T = 4 only, to keep the time budget.
Polar: ops.polar(backend="cuda") and (backend="torch") against U @ Vh of torch.linalg.svd
(ref.polar; batched call and loop) on the concatenations SCORE builds, Ucat (m x Tk) and Vcat
(Tk x n) of 12 ViT-B keys with T = 5, from task matrices sharing a low-rank part (as fine-tuned
experts' subspaces do; their condition numbers are recorded).

Timing (bench/harness.py): same process, same inputs, minima over interleaved rounds. A contender
that loops over the batch is probed on one matrix and timed on as many as fit in CAP_S, its time
scaled by B / n (column timed_on = n; exact for loops up to launch overheads, an upper bound for
gesvda's batched kernel); a first call longer than SLOW_S is taken as the measurement (timed once).
Errors against float64 on the CPU, on the first ERR_ITEMS matrices of each batch only (a
subsample: float64 SVDs of all 60 or 8 would take minutes): sv_err = max_i |s_i - s*_i| / s*_1;
rec_err = (||A - U S Vh||_F - e*) / e*, e* the exact rank-k error; polar: relative Frobenius error.

End to end, SCORE (variant full):
- ViT-B/16-shaped model (12 blocks of CLIP's ViT-B: 2304x768, 768x768, 3072x768, 768x3072, biases
  and norms), T = 5, tensors on the GPU: backend="auto" against backend="reference" (the authors'
  per-key algorithm: torch.linalg.svd per matrix; timed ONCE, not interleaved: it takes tens of
  seconds) and backend="torch" (once); error of each against float64 for block 0's keys.
- 7B-LLM decoder layers (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008, two norms),
  T = 4: one layer timed and the time EXTRAPOLATED to 32 layers; the per-key reference for 32
  layers is an ESTIMATE (not run) from the torch.linalg.svd times measured on the LLM shapes
  (a wide 4096x11008 SVD counted as its transpose's).
Goals on an H200: truncated SVD and polar >= 10x torch.linalg.svd on the ViT-B batches;
the ViT-B SCORE merge >= 30x the per-key reference; the 7B SCORE merge in minutes.

The file keeps to BUDGET_S seconds (SCOREMERGE_BENCH_BUDGET_S, default 285; bench/gpu_run.sh sets
it to the part's time box): a part that would start with too little time left is skipped and its
row says so; cases needing more than ~100 GB (or 85% of the device) are skipped.
Results: bench/results/svd_gpu.json, and a table on stdout.
"""
import collections
import os
import time

import pytest
import torch

import scoremerge
from scoremerge import BackendUnavailableError, ops, ref

from harness import best_time, ceilings, interleaved, record, rel_err, sync
from workloads import VIT_B_BLOCK

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"
TS = (2, 4, 6)
VIT_SHAPES, VIT_BATCH = [(768, 768), (3072, 768), (768, 3072)], 60
VIT_POLAR = [("U", 768, 768), ("U", 3072, 768), ("V", 768, 768), ("V", 768, 3072)]
VIT_BLOCK, VIT_BLOCKS, VIT_T = VIT_B_BLOCK, 12, 5
LLM_SHAPES, LLM_BATCH, LLM_T = [(4096, 4096), (11008, 4096)], 8, 4
LLM_LAYER = {"self_attn.q_proj.weight": (4096, 4096), "self_attn.k_proj.weight": (4096, 4096),
             "self_attn.v_proj.weight": (4096, 4096), "self_attn.o_proj.weight": (4096, 4096),
             "mlp.gate_proj.weight": (11008, 4096), "mlp.up_proj.weight": (11008, 4096),
             "mlp.down_proj.weight": (4096, 11008), "input_layernorm.weight": (4096,),
             "post_attention_layernorm.weight": (4096,)}
LLM_LAYERS = 32
ERR_ITEMS = {"vit_b16": 4, "llm_7b": 1}
SEARCH_S = {"vit_b16": 1.5, "llm_7b": 6.0}     # svd_lowrank's niter search, per case
CAP_S = 0.25             # a looping contender is timed on as many matrices as fit in this
SLOW_S = 1.0             # a first call longer than this is the measurement
OVERSAMPLE, NITERS = 10, (1, 2, 4, 8, 16)
BUDGET_S = float(os.environ.get("SCOREMERGE_BENCH_BUDGET_S", "285"))
MAX_BYTES = 100e9
ROWS = []
SVD_SECONDS = {}         # (m, n), m >= n: seconds of one torch.linalg.svd, default driver
STATE = {}


def left():
    return BUDGET_S - (time.perf_counter() - STATE["start"])


def require(seconds, nbytes, what):
    """Skip (with a row saying why) when less than `seconds` of the budget is left, or the case
    needs more device memory than MAX_BYTES or 85% of the device."""
    limit = MAX_BYTES
    if torch.device(DEVICE).type == "cuda":
        limit = min(limit, 0.85 * torch.cuda.get_device_properties(DEVICE).total_memory)
    reason = None
    if nbytes > limit:
        reason = f"needs ~{nbytes / 1e9:.0f} GB of device memory, over {limit / 1e9:.0f} GB"
    elif left() < seconds:
        reason = f"time budget: {left():.0f} s left of {BUDGET_S:.0f}, this part wants {seconds:.0f}"
    if reason:
        ROWS.append({"case": what, "skipped": reason})
        pytest.skip(reason)


def load_cupy():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()        # fails here when its CUDA cannot run
        return cupy, f"cupy {cupy.__version__}"
    except Exception as e:                        # ImportError, or a CUDA mismatch
        return None, f"cupy unavailable: {type(e).__name__}: {e}"[:300]


def cuda_linalg_status():
    """None when ops.truncated_svd and ops.polar run with backend="cuda" here, else why not."""
    try:
        x = torch.randn(2, 8, 6, device=DEVICE)
        ops.truncated_svd(x, 2, backend="cuda")
        ops.polar(x, backend="cuda")
    except BackendUnavailableError as e:
        return str(e)
    except Exception as e:                        # a failing kernel: its rows would fail alike
        return f"fails: {type(e).__name__}: {e}"[:300]
    return None


def float64_matmul_rate():
    """TFLOP/s of a large float64 matmul (the Gram products run in float64)."""
    size = 8192 if torch.device(DEVICE).type == "cuda" else 256
    a = torch.randn(size, size, device=DEVICE, dtype=torch.float64)
    return 2 * size**3 / best_time(lambda: a @ a, device=DEVICE) / 1e12


def warm_up():
    """One small call of each library path, so that handle creation and first-call set-up are not
    in any probe. A path that fails here fails again, and is reported, in its own rows."""
    x = torch.randn(3, 40, 24, device=DEVICE)
    calls = [lambda: torch.linalg.svd(x, full_matrices=False),
             lambda: torch.linalg.eigh((x.mT @ x).double()),
             lambda: torch.svd_lowrank(x, q=4, niter=1),
             lambda: ops.truncated_svd(x, 4, backend="torch")]
    if torch.device(DEVICE).type == "cuda":
        calls.append(lambda: torch.linalg.svd(x, full_matrices=False, driver="gesvda"))
    for call in calls:
        try:
            call()
        except Exception:
            pass
    sync(DEVICE)


@pytest.fixture(scope="module")
def env():
    STATE["start"] = time.perf_counter()
    rates = {**ceilings(DEVICE), "matmul_float64_TFLOPs": float64_matmul_rate()}
    STATE["cupy"], cupy_note = load_cupy()
    STATE["cuda_error"] = cuda_linalg_status()
    warm_up()
    header = {"ceilings": rates, "cupy": cupy_note, "cuda_backend": STATE["cuda_error"] or "available",
              "torch_cuda": torch.version.cuda, "budget_s": BUDGET_S, "err_items": ERR_ITEMS,
              "cap_s": CAP_S, "slow_s": SLOW_S}
    yield header
    header["wall_s"] = time.perf_counter() - STATE["start"]
    rows = ROWS + llm_reference_estimate()
    record("svd_gpu", [header] + rows, DEVICE)
    print_table(header, rows)


# ---------------------------------------------------------------------------------------- inputs

def task_like(lead, m, n, seed, shared=False):
    """fp32 task-vector-like matrices [*lead, m, n] on DEVICE: low rank (unit-variance entries)
    plus 0.1 noise, times 1e-3. shared: half the rank is common along the last leading dim
    (tasks fine-tuned from one base share directions)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    rank = max(1, min(m, n) // 8)

    def low_rank(*dims, r):
        L = torch.randn(*dims, m, r, generator=g, device=DEVICE)
        return L @ torch.randn(*dims, r, n, generator=g, device=DEVICE) / r**0.5

    if shared:
        rank = max(1, rank // 2)
    X = low_rank(*lead, r=rank) + 0.1 * torch.randn(*lead, m, n, generator=g, device=DEVICE)
    if shared:
        X += low_rank(*lead[:-1], 1, r=rank)
    return 1e-3 * X


def task_vectors(shapes, T, seed):
    """T task vectors {key: fp32 tensor on DEVICE}: matrices from task_like (shared part), the
    rest small noise."""
    tvs = [{} for _ in range(T)]
    for i, (key, shape) in enumerate(shapes.items()):
        if len(shape) == 2:
            values = task_like((T,), *shape, seed=seed + i, shared=True)
        else:
            g = torch.Generator(device=DEVICE).manual_seed(seed + i)
            values = 1e-3 * torch.randn(T, *shape, generator=g, device=DEVICE)
        for t in range(T):
            tvs[t][key] = values[t].clone()
    return tvs


def model_shapes(layer, prefix, count):
    return {f"{prefix}.{i}.{key}": shape for i in range(count) for key, shape in layer.items()}


# ----------------------------------------------------------------------------- timing and errors

def timed_once(fn):
    sync(DEVICE)
    start = time.perf_counter()
    out = fn()
    sync(DEVICE)
    return time.perf_counter() - start, out


def measure(runs, B, batched=()):
    """({name: seconds for all B matrices, matrices timed, how}, {name: output of its last call}).

    runs: {name: run}, run(n) computing the contender on the first n matrices. Contenders in
    `batched` always run all B; the others are probed on one matrix, then timed on as many as
    fit in CAP_S and scaled by B / n. A first call (the warm-up) longer than SLOW_S is the
    measurement; the rest are timed interleaved (harness.interleaved), 3 rounds when a round
    takes under a second, else 1. A contender that raises is reported with its error."""
    plan, first, outs, result = {}, {}, {}, {}
    for name, run in runs.items():
        n = B if name in batched else 1
        try:
            first[name], outs[name] = timed_once(lambda: run(n))
        except Exception as e:                    # CuPy, or a driver that cannot take this input
            result[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        if first[name] > SLOW_S:
            result[name] = {"seconds": first[name] * B / n, "timed_on": n, "timing": "one call"}
        else:
            plan[name] = n if name in batched else max(1, min(B, int(CAP_S / first[name])))
    if plan:
        round_s = sum(first[name] * n / (B if name in batched else 1) for name, n in plan.items())
        rounds = 3 if round_s < 1.0 else 1
        fns = [lambda name=name: outs.__setitem__(name, runs[name](plan[name])) for name in plan]
        for (name, n), t in zip(plan.items(), interleaved(*fns, rounds=rounds, device=DEVICE)):
            result[name] = {"seconds": t * B / n, "timed_on": n,
                            "timing": f"min of {rounds} interleaved"}
    return result, outs


def first_items(out, count):
    """Copies of the first `count` items of a contender's output (a triple of batched tensors or
    CuPy arrays, or a loop's list of triples) as a triple of batched torch tensors."""
    if isinstance(out, list):
        return tuple(torch.stack(parts) for parts in zip(*out[:count]))
    return tuple((x if isinstance(x, torch.Tensor) else torch.from_dlpack(x))[:count].clone()
                 for x in out)


def svd_errors(A, factors, truth, k):
    """(sv_err, rec_err, items) of U, S, Vh (at least k columns) over the first items of A; truth:
    float64 singular values of those items (CPU)."""
    U, S, Vh = factors
    n = min(len(truth), len(S))
    U, S, Vh = U[:n, :, :k].double(), S[:n, :k].double(), Vh[:n, :k].double()
    s = truth[:n].to(S.device)
    sv = ((S - s[:, :k]).abs().amax(dim=1) / s[:, 0]).max().item()
    e = (A[:n].double() - (U * S[:, None]) @ Vh).flatten(1).norm(dim=1)
    e_star = s[:, k:].norm(dim=1)
    return sv, ((e - e_star) / e_star).max().item(), n


def speedups(row, base):
    for label, seconds in base.items():
        if seconds and row.get("seconds"):
            row[f"x_vs_{label}"] = seconds / row["seconds"]
    return row


# ------------------------------------------------------------------------------- truncated SVD

def raises(error):
    def run(n):
        raise error
    return run


def full_svd_runs(A, batched_calls, optional):
    """The full-SVD contenders (independent of k) on A [B, m, n]; without `optional`, only the
    default driver's loop (the reference's SVD)."""
    runs = {"svd_loop": lambda n: [torch.linalg.svd(a, full_matrices=False) for a in A[:n]]}
    if batched_calls:
        runs["svd"] = lambda n: torch.linalg.svd(A[:n], full_matrices=False)
    if not optional:
        return runs
    runs["gesvda_loop"] = lambda n: [torch.linalg.svd(a, full_matrices=False, driver="gesvda")
                                     for a in A[:n]]
    if batched_calls:
        runs["gesvda"] = lambda n: torch.linalg.svd(A[:n], full_matrices=False, driver="gesvda")
    cupy = STATE["cupy"]
    if cupy is not None:
        try:
            A_cp = cupy.from_dlpack(A)
            runs["cupy"] = lambda n: cupy.linalg.svd(A_cp[:n], full_matrices=False)
        except Exception as e:                    # its row reports it
            runs["cupy"] = raises(e)
    return runs


def lowrank(A, k, niter):
    q = min(k + OVERSAMPLE, min(A.shape[-2:]))

    def run(n):
        U, S, V = torch.svd_lowrank(A[:n], q=q, niter=niter)
        return U[..., :k], S[..., :k], V[..., :k].mT
    return run


def lowrank_search(A, truth, k, target, seconds):
    """{niter: (sv_err, rec_err, items)} on the error subsample for niter in NITERS, stopping at
    the first within `target` or once `seconds` are spent."""
    tried, start = {}, time.perf_counter()
    for niter in NITERS:
        torch.manual_seed(0)
        tried[niter] = svd_errors(A, lowrank(A, k, niter)(len(truth)), truth, k)
        if tried[niter][0] <= target or time.perf_counter() - start > seconds:
            break
    return tried


def lowrank_runs(A, truth, k, fast, seconds):
    """svd_lowrank contenders at the accuracy of `fast` (a run; its error on the subsample), and a
    note per contender on how niter was set."""
    try:
        ours = svd_errors(A, fast(len(truth)), truth, k)[0]
    except Exception as e:                        # the fast path's own row reports the failure
        return {}, {"svd_lowrank": {"skipped": f"no accuracy to match: {type(e).__name__}: {e}"}}
    tried = lowrank_search(A, truth, k, 2 * ours, seconds)
    first_meeting = {}
    for label, target in (("svd_lowrank", 2 * ours), ("svd_lowrank_1e-5", 1e-5)):
        reached = [niter for niter, err in tried.items() if err[0] <= target]
        first_meeting[label] = (min(reached), True) if reached else (max(tried), False)
    runs, notes = {}, {}
    for label, (niter, reached) in first_meeting.items():
        if label != "svd_lowrank" and (not reached or niter == first_meeting["svd_lowrank"][0]):
            continue
        runs[label] = lowrank(A, k, niter)
        sv, rec, items = tried[niter]
        notes[label] = {"niter": niter, "target_sv_err": 2 * ours if label == "svd_lowrank" else 1e-5,
                        "reached": reached, "sv_err": sv, "rec_err": rec, "err_items": items,
                        "niter_sv_errs": {i: e[0] for i, e in tried.items()}}
    return runs, notes


def run_svd_case(case, m, n, B):
    r = min(m, n)
    require(40 if case == "llm_7b" else 20, 10 * B * m * n * 4, f"truncated_svd {case} {m}x{n}")
    A = task_like((B,), m, n, seed=m + 2 * n)
    n_err = ERR_ITEMS[case]
    truth = torch.linalg.svdvals(A[:n_err].double().cpu())
    optional = case == "vit_b16" or left() > 80
    full, outs = measure(full_svd_runs(A, case == "vit_b16", optional), B)
    full_out = {}
    for name, out in outs.items():
        try:
            full_out[name] = first_items(out, n_err)
        except Exception as e:                    # e.g. DLPack from CuPy: the row says so
            full[name]["error"] = f"reading its output: {type(e).__name__}: {e}"[:300]
    del outs
    if STATE["cupy"] is not None:
        STATE["cupy"].get_default_memory_pool().free_all_blocks()
    if not optional:
        for name in ("gesvda_loop", "cupy") if STATE["cupy"] is not None else ("gesvda_loop",):
            full[name] = {"skipped": f"time budget: {left():.0f} s left"}
    if "seconds" in full.get("svd_loop", {}):
        SVD_SECONDS[(max(m, n), min(m, n))] = full["svd_loop"]["seconds"] / B
    base = {"svd": full.get("svd", {}).get("seconds"),
            "svd_loop": full.get("svd_loop", {}).get("seconds")}
    for T in TS:
        k = r // T
        runs, notes = {}, {}
        if STATE["cuda_error"] is None:
            runs["cuda"] = lambda n, k=k: ops.truncated_svd(A[:n], k, backend="cuda")
        if case == "vit_b16" or T == LLM_T:
            runs["torch"] = lambda n, k=k: ops.truncated_svd(A[:n], k, backend="torch")
            if left() > 30:
                more, notes = lowrank_runs(A, truth, k, runs[next(iter(runs))], SEARCH_S[case])
                runs.update(more)
            else:
                notes["svd_lowrank"] = {"skipped": f"time budget: {left():.0f} s left"}
        timed, outs = measure(runs, B, batched=("cuda",))
        for name, res in {**full, **notes, **timed}.items():
            row = speedups({"op": "truncated_svd", "case": case, "shape": f"{B}x{m}x{n}", "T": T,
                            "k": k, "contender": name, **notes.get(name, {}), **res}, base)
            factors = full_out.get(name) or (first_items(outs[name], n_err) if name in outs
                                             else None)
            if factors is not None and "sv_err" not in row:   # svd_lowrank: its search's errors
                row["sv_err"], row["rec_err"], row["err_items"] = svd_errors(A, factors, truth, k)
            ROWS.append(row)
        del outs


@pytest.mark.parametrize("m, n", VIT_SHAPES)
def test_truncated_svd_vit_b16(env, m, n):
    run_svd_case("vit_b16", m, n, VIT_BATCH)


# ---------------------------------------------------------------------------------------- polar

def concatenation(side, m, n, B, T, seed):
    """Ucat [B, m, Tk] or Vcat [B, Tk, n] as SCORE builds them from T task matrices per key."""
    tau = task_like((B, T), m, n, seed=seed, shared=True)
    k = min(m, n) // T
    U, _, Vh = ops.truncated_svd(tau, k)
    if side == "U":
        return U.permute(0, 2, 1, 3).reshape(B, m, T * k).contiguous()
    return Vh.reshape(B, T * k, n).contiguous()


def run_polar_case(case, side, m, n, B, T, n_err):
    require(30 if case == "llm_7b" else 10, 12 * B * T * m * n * 4, f"polar {case} {side} {m}x{n}")
    X = concatenation(side, m, n, B, T, seed=3 * m + n)
    runs = {"svd": lambda n: ref.polar(X[:n]), "svd_loop": lambda n: [ref.polar(x) for x in X[:n]],
            "torch": lambda n: ops.polar(X[:n], backend="torch")}
    if STATE["cuda_error"] is None:
        runs = {"cuda": lambda n: ops.polar(X[:n], backend="cuda"), **runs}
    timed, outs = measure(runs, B, batched=("cuda",))
    extra = {}
    if n_err:
        X64 = X[:n_err].double().cpu()
        answer, s = ref.polar(X64), torch.linalg.svdvals(X64)
        extra["kappa"] = (s[:, 0] / s[:, -1]).tolist()
    base = {"svd": timed.get("svd", {}).get("seconds"),
            "svd_loop": timed.get("svd_loop", {}).get("seconds")}
    for name, res in timed.items():
        row = speedups({"op": "polar", "case": case, "shape": "x".join(map(str, X.shape)),
                        "side": side, "T": T, "contender": name, **res, **extra}, base)
        if n_err and name in outs:
            P = outs[name]
            P = (torch.stack(P[:n_err]) if isinstance(P, list) else P[:n_err]).double().cpu()
            row["err"] = max(((P[i] - answer[i]).norm() / answer[i].norm()).item()
                             for i in range(len(P)))
            row["err_items"] = len(P)
        ROWS.append(row)


@pytest.mark.parametrize("side, m, n", VIT_POLAR)
def test_polar_vit_b16(env, side, m, n):
    run_polar_case("vit_b16", side, m, n, VIT_BLOCKS, VIT_T, n_err=2)


# ------------------------------------------------------------------------------- end to end

def test_score_merge_vit_b16(env):
    shapes = model_shapes(VIT_BLOCK, "blocks", VIT_BLOCKS)
    nbytes = 8 * VIT_T * sum(torch.Size(s).numel() for s in shapes.values()) * 4
    require(60, nbytes, "score_merge vit_b16")
    tvs = task_vectors(shapes, VIT_T, seed=1)

    def merge(backend):
        return scoremerge.merge_task_vectors(tvs, "score", backend=backend)

    first, _ = timed_once(lambda: merge("auto"))        # the warm-up
    rounds = 3 if first < 2 * SLOW_S else 1
    fast_s = best_time(lambda: merge("auto"), rounds=rounds, warmup=0, device=DEVICE)
    row = {"op": "score_merge", "case": "vit_b16", "shape": f"{VIT_BLOCKS} blocks", "T": VIT_T,
           "contender": "auto", "seconds": fast_s, "timing": f"min of {rounds} after a warm-up"}
    out = {"auto": merge("auto")}
    row["reference_s"], out["reference"] = timed_once(lambda: merge("reference"))
    row["reference_timing"] = "one call (tens of seconds), not interleaved"
    row["x_vs_reference"] = row["reference_s"] / fast_s
    row["goal_x"], row["goal_met"] = 30, row["x_vs_reference"] >= 30
    if left() > 30:
        row["torch_s"], out["torch"] = timed_once(lambda: merge("torch"))
        row["x_vs_torch"] = row["torch_s"] / fast_s
    block0 = [key for key in shapes if key.startswith("blocks.0.")]
    answer = ref.merge_task_vectors([{k: tv[k].double().cpu() for k in block0} for tv in tvs],
                                    "score")
    errs = {name: {k: rel_err(o[k], answer[k]) for k in block0} for name, o in out.items()}
    for name, e in errs.items():
        row[f"err_{name}"] = max(e.values())
    row["err_keys"] = "block 0 against float64 (CPU)"
    ROWS.append(row)
    for key in block0:                                   # the goal's bound, per key
        assert errs["auto"][key] <= max(2 * errs["reference"][key], 1e-3), key


def test_score_merge_llm_7b(env):
    shapes = model_shapes(LLM_LAYER, "layers", 1)
    nbytes = 4 * LLM_T * sum(torch.Size(s).numel() for s in shapes.values()) * 4
    require(60, nbytes, "score_merge llm_7b")
    tvs = task_vectors(shapes, LLM_T, seed=2)
    seconds, _ = timed_once(lambda: scoremerge.merge_task_vectors(tvs, "score", backend="auto"))
    timing = "one call (includes first calls at these sizes)"
    if left() > 2 * seconds + 20:
        again, _ = timed_once(lambda: scoremerge.merge_task_vectors(tvs, "score", backend="auto"))
        seconds, timing = min(seconds, again), "min of 2 calls"
    ROWS.append({"op": "score_merge", "case": "llm_7b", "shape": "1 decoder layer", "T": LLM_T,
                 "contender": "auto", "seconds": seconds, "timing": timing,
                 f"seconds_{LLM_LAYERS}_layers_EXTRAPOLATED": seconds * LLM_LAYERS})


@pytest.mark.parametrize("m, n", LLM_SHAPES)
def test_truncated_svd_llm_7b(env, m, n):
    run_svd_case("llm_7b", m, n, LLM_BATCH)


def test_polar_llm_7b(env):
    """Ucat of one layer's q/k/v/o (4096 x Tk), T = 4; timing only (a float64 SVD of a 4096x4096
    matrix for the error would take longer than the budget allows)."""
    run_polar_case("llm_7b", "U", 4096, 4096, 4, LLM_T, n_err=0)


def reference_svd_count(shapes, T):
    """{(m, n), m >= n: torch.linalg.svd calls} of the per-key SCORE reference: T per matrix key
    and one for each polar factor (m x Tk, Tk x n); a wide matrix counted as its transpose."""
    count = collections.Counter()
    for shape in shapes.values():
        if len(shape) == 2:
            m, n = shape
            p = T * (min(m, n) // T)
            for a, b in [(m, n)] * T + [(m, p), (p, n)]:
                count[(max(a, b), min(a, b))] += 1
    return count


def llm_reference_estimate():
    count = reference_svd_count(LLM_LAYER, LLM_T)
    if not all(shape in SVD_SECONDS for shape in count):
        return []
    layer_s = sum(c * SVD_SECONDS[shape] for shape, c in count.items())
    row = {"op": "score_merge", "case": "llm_7b", "contender": "reference_ESTIMATE",
           "T": LLM_T, f"seconds_{LLM_LAYERS}_layers_ESTIMATE": layer_s * LLM_LAYERS,
           "how": f"not run: {dict(count)} torch.linalg.svd calls per layer x the per-matrix "
                  "times measured on the LLM shapes"}
    fast = [r for r in ROWS if r.get("case") == "llm_7b" and r.get("op") == "score_merge"]
    if fast:
        row["x_vs_auto_ESTIMATE"] = layer_s / fast[0]["seconds"]
    return [row]


# ---------------------------------------------------------------------------------------- table

COLUMNS = [("op", "{}"), ("case", "{}"), ("shape", "{}"), ("T", "{}"), ("k", "{}"),
           ("contender", "{}"), ("seconds", "{:.4f}"), ("timed_on", "{}"), ("x_vs_svd", "{:.1f}"),
           ("x_vs_svd_loop", "{:.1f}"), ("sv_err", "{:.1e}"), ("rec_err", "{:.1e}"),
           ("err", "{:.1e}"), ("niter", "{}"), ("reached", "{}")]


def print_table(header, rows):
    print(f"\n{header['ceilings']}\ncuda backend: {header['cuda_backend']}; {header['cupy']}")
    print(" ".join(name for name, _ in COLUMNS))
    for row in rows:
        cells = [fmt.format(row[name]) if row.get(name) is not None else "-" for name, fmt in COLUMNS]
        rest = {k: v for k, v in row.items() if k not in dict(COLUMNS) and k in (
            "skipped", "error", "reference_s", "x_vs_reference", "goal_met", "torch_s",
            "x_vs_torch", "err_auto", "err_reference", "kappa", "timing",
            f"seconds_{LLM_LAYERS}_layers_EXTRAPOLATED", f"seconds_{LLM_LAYERS}_layers_ESTIMATE",
            "x_vs_auto_ESTIMATE")}
        print(" ".join(cells), rest if rest else "")
