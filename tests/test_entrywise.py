"""Entry-wise methods merged key by key in chunks (methods.entrywise) equal the whole-key
computation to the bit, catch NaN/Inf inputs through their outputs, and refuse overflow."""
import pytest
import torch

from scoremerge import MergeInputError, api
from scoremerge.methods import all_methods, get
from scoremerge.methods.entrywise import CPU_CHUNK, plus

ENTRYWISE = [name for name, spec in all_methods().items() if spec.entrywise]
OF_TASK_VECTORS = [name for name in ENTRYWISE if not all_methods()[name].on_models]
# Odd sizes; one key spans several chunks with a ragged last one; an empty key.
SHAPES = {"w": (37, 29), "big": (3, CPU_CHUNK // 7 + 5, 7 * 2 + 1), "b": (37,), "empty": (0, 4),
          "head.w": (5, 29)}


def models(T, base_dtype, expert_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g).to(base_dtype) for k, s in SHAPES.items()}
    base["ids"] = torch.arange(6)
    experts = [{k: (v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64))
                .to(expert_dtype) if v.is_floating_point() else v.clone()
                for k, v in base.items()} for _ in range(T)]
    return base, experts


def whole_key(base, experts, method, alpha, exclude, weights=None):
    """api.merge's arithmetic without chunks: task vectors stacked per key, merged at once."""
    spec, opts = api.checked_method(method, {}, len(experts))
    taus = api._merge(api._task_vectors(base, experts), spec, opts, exclude, "torch", None,
                      None, False, weights)
    return {k: plus(b.to(taus[k].dtype), taus[k], alpha).to(b.dtype)
            if k in taus else b for k, b in base.items()}


def test_the_flag_is_honest():
    """A method marked entrywise merges any subset of entries as it merges them in place."""
    assert set(ENTRYWISE) >= {"mean", "task_arithmetic", "magmax"}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 301, generator=g, dtype=torch.float64)
    pick = torch.randperm(301, generator=g)[:97]
    for name in ENTRYWISE:
        spec = get(name)
        whole = spec.fn({"k": x}, **spec.defaults)["k"]
        part = spec.fn({"k": x[:, pick]}, **spec.defaults)["k"]
        assert torch.equal(whole[pick], part), name


@pytest.mark.parametrize("method", OF_TASK_VECTORS)
@pytest.mark.parametrize("base_dtype, expert_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32), (torch.float64, torch.float64),
    (torch.bfloat16, torch.float64)])
@pytest.mark.parametrize("weights", [None, (0.5, -1.25, 2.0)])
def test_chunked_equals_whole_key_to_the_bit(method, base_dtype, expert_dtype, weights):
    base, experts = models(3, base_dtype, expert_dtype)
    exclude = ("head",)
    got = api.merge(base, experts, method, alpha=0.7, exclude=exclude, weights=weights)
    want = whole_key(base, experts, method, 0.7, exclude, weights)
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_a_compute_dtype_wider_than_the_inputs():
    base, experts = models(4, torch.float32, torch.float32, seed=1)
    got = api.merge(base, experts, "task_arithmetic", dtype="float64")
    spec, opts = api.checked_method("task_arithmetic", {}, 4)
    taus = api._merge(api._task_vectors(base, experts), spec, opts, (), "torch", None,
                      "float64", False)
    for key, b in base.items():
        want = torch.add(b, taus[key]).to(b.dtype) if key in taus else b
        assert torch.equal(got[key], want), key


@pytest.mark.parametrize("method", OF_TASK_VECTORS)
@pytest.mark.parametrize("where", ["base", "expert 0", "expert 1", "expert 2"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_input_is_named_through_the_output(method, where, bad):
    """No separate scan of the inputs: whichever model holds the NaN or Inf, the merged entry
    carries it (MagMax's comparisons included, which a NaN never wins)."""
    base, experts = models(3, torch.float32, torch.float32)
    model = base if where == "base" else experts[int(where[-1])]
    model["big"].view(-1)[CPU_CHUNK + 3] = bad                # in the second chunk
    spec, opts = api.checked_method(method, {}, 3)
    with pytest.raises(MergeInputError, match=rf"key 'big' of (the )?{where} contains "
                                              rf"{'NaN' if bad != bad else 'Inf'}"):
        api.merge_checked(base, experts, spec, opts, alpha=1.0, exclude=())


def test_overflow_is_refused_unless_allowed():
    base = {"w": torch.full((3, 5), 60000.0, dtype=torch.float16)}
    experts = [{"w": torch.full((3, 5), 65000.0, dtype=torch.bfloat16)} for _ in range(2)]
    with pytest.raises(MergeInputError, match=r"key 'w' of the merged model holds Inf in "
                                              r"float16.*--allow-nonfinite"):
        api.merge(base, experts, "task_arithmetic")
    merged = api.merge(base, experts, "task_arithmetic", allow_nonfinite=True)
    assert torch.isinf(merged["w"]).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_threads_share_every_entry_once(threads, monkeypatch):
    """run_jobs cuts the entries of all keys into one contiguous share per thread: every entry
    of every key is merged exactly once, whatever the key sizes (empty keys too)."""
    from scoremerge.methods import entrywise

    class Job:
        def __init__(self, n):
            self.base, self.spans = torch.empty(n), []

        def run(self, lo, hi, chunk):
            self.spans.append((lo, hi))

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(entrywise, "parallel_map", lambda fn, items: [fn(i) for i in items])
    g = torch.Generator().manual_seed(threads)
    sizes = [0, 1, 7, CPU_CHUNK - 1, CPU_CHUNK, 3 * CPU_CHUNK + 11, 5] + \
        torch.randint(0, 2 * CPU_CHUNK, (6,), generator=g).tolist()
    jobs = [Job(n) for n in sizes]
    entrywise.run_jobs(jobs, torch.device("cpu"))
    for job, n in zip(jobs, sizes):
        ends = [0]
        for lo, hi in sorted(job.spans):
            assert lo == ends[-1] and hi > lo
            ends.append(hi)
        assert ends[-1] == n
