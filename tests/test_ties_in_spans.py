"""TIES per tensor over a key larger than the streaming budget: the key ranked whole from its
spans (radix selection, or mergekit's exact trim from the gathered magnitudes), then merged span
by span, to the bits of the in-memory merge, for every option; bad values found while ranking
are named and leave nothing behind."""
import pytest
import torch

from scoremerge import MergeInputError, api
from scoremerge.io import checkpoint, load_state_dict, save_state_dict
from scoremerge.methods import sort_prefix, ties_ranking
from scoremerge.streaming import merge_checkpoints


def tie_heavy(g, n, dtype, spread=4.0):
    """Rounded normals: many equal magnitudes, zeros of both signs."""
    x = (torch.randn(n, generator=g, dtype=torch.float64) * spread).round().to(dtype)
    x[::7] = -0.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, span", [(1, 1), (97, 10), (4099, 1000), (20_011, 4096)])
def test_radix_selection_is_the_kth_largest_exactly(dtype, n, span):
    g = torch.Generator().manual_seed(n)
    rows = torch.stack([tie_heavy(g, n, dtype), torch.randn(n, generator=g, dtype=dtype),
                        tie_heavy(g, n, dtype, spread=1e-3) * 1e30])
    spans = [(lo, min(n, lo + span)) for lo in range(0, n, span)]
    for keep in {min(n, k) for k in (1, 2, n // 3 + 1, n // 2 + 1, n)}:
        keeps = [keep, max(1, n - keep + 1), keep]
        got = ties_ranking._radix_select(lambda tasks, lo, hi: rows[tasks, lo:hi], spans,
                                         [0, 1, 2], keeps, dtype, rows.device)
        want = [row.abs().kthvalue(n - k + 1).values for row, k in zip(rows, keeps)]
        assert got.dtype == dtype and torch.equal(got, torch.stack(want)), keep


@pytest.mark.parametrize("n", [1, 7, 8, 9, 4099, 20_000])
def test_a_packed_mask_reads_back_every_slice(n, monkeypatch):
    monkeypatch.setattr(ties_ranking.PackedMask, "_PIECE", 64)     # many pieces, one ragged
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.3
    packed = ties_ranking.PackedMask(mask)
    assert packed.bits.numel() == -(-n // 8)
    bounds = sorted({0, n, *torch.randint(0, n + 1, (20,), generator=g).tolist()})
    for lo in bounds:
        for hi in bounds:
            if lo < hi:
                assert torch.equal(packed[lo:hi], mask[lo:hi]), (lo, hi)


def model(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(301, 23, generator=g).to(dtype),
            "blocks.0.w": torch.randn(37, 29, generator=g).to(dtype),
            "norm.weight": torch.ones(23, dtype=dtype),
            "position_ids": torch.arange(3001)}         # an integer key larger than the budget


def finetuned(base, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype)
            if v.is_floating_point() else v.clone() for k, v in base.items()}


@pytest.fixture(params=[torch.bfloat16, torch.float32, torch.float64, "mixed"],
                ids=["bf16", "fp32", "fp64", "mixed"])
def checkpoints(request, tmp_path):
    """Base and experts in one dtype, or (mixed) a bf16 base with bf16, float64 and float32
    experts: each expert's task vector promotes on its own (api._tau_dtype)."""
    mixed = request.param == "mixed"
    base = model(0, torch.bfloat16 if mixed else request.param)
    experts = [finetuned(base, s) for s in (1, 2, 3)]
    if mixed:
        experts = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in e.items()}
                   for e, dtype in zip(experts, (torch.bfloat16, torch.float64, torch.float32))]
    paths = [save_state_dict(sd, tmp_path / f"m{i}.safetensors")
             for i, sd in enumerate([base] + experts)]
    return paths[0], paths[1:]


OPTIONS = [
    {},
    {"trim": "exact", "zero_sign": "plus"},                         # mergekit's TIES
    {"trim": "exact", "zero_sign": "majority", "disjoint": "sum", "density": [0.3, 1.0, 0.05]},
    {"zero_sign": "majority", "disjoint": "max", "density": 0.9},
    {"density": [0.5, 0.2, 0.7], "disjoint": "sum", "weights": [0.5, 2.0, -1.0]},
    {"trim": "exact", "weights": [0.3, 0.3, 0.4], "zero_sign": "majority"},
    {"dtype": "float64", "trim": "exact"},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                    o.items()) or "defaults")
def test_a_key_larger_than_the_budget_merges_in_spans_to_the_same_bits(checkpoints, tmp_path,
                                                                        options, monkeypatch):
    base, experts = checkpoints
    reads = []
    real_read = checkpoint.Checkpoint.read

    def read(self, key, start=None, stop=None, out=None):
        reads.append((key, start, stop))
        return real_read(self, key, start, stop, out)

    monkeypatch.setattr(checkpoint.Checkpoint, "read", read)
    stats = merge_checkpoints(base, experts, tmp_path / "out", "ties", scope="tensor",
                              progress=False, max_memory="8KB", **options)
    monkeypatch.undo()
    inputs = sum(p.stat().st_size for p in (base, *experts))
    assert stats["ranking_s"] > 0 and stats["bytes_read"] > inputs    # the ranking's reads too
    got = load_state_dict(tmp_path / "out")
    want = api.merge(load_state_dict(base), [load_state_dict(e) for e in experts], "ties",
                     scope="tensor", **options)
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    # the embedding was read in spans only, more than once (the ranking's passes, the merge)
    embed = [(lo, hi) for key, lo, hi in reads if key == "embed.weight"]
    assert embed and all(lo is not None for lo, _ in embed)
    per_entry = 4 * torch.empty(0, dtype=load_state_dict(base)["embed.weight"].dtype).itemsize
    assert max(hi - lo for lo, hi in embed) * per_entry <= 2048
    assert len(embed) > 2 * len({span for span in embed})


def test_the_exact_trim_without_the_compiled_replay_is_the_same(checkpoints, tmp_path,
                                                                 monkeypatch):
    """Where scoremerge._cpu is absent, a task with no tie across the cut keeps a threshold and
    one with a tie takes the torch replay's mask: the same entries."""
    base, experts = checkpoints
    merge_checkpoints(base, experts, tmp_path / "a", "ties", scope="tensor", trim="exact",
                      progress=False, max_memory="8KB")
    monkeypatch.setattr(ties_ranking, "compiled", lambda: False)
    monkeypatch.setattr(sort_prefix, "compiled", lambda: False)
    merge_checkpoints(base, experts, tmp_path / "b", "ties", scope="tensor", trim="exact",
                      progress=False, max_memory="8KB")
    a, b = load_state_dict(tmp_path / "a"), load_state_dict(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_excluded_key_larger_than_the_budget_takes_the_mean_in_spans(checkpoints, tmp_path):
    base, experts = checkpoints
    merge_checkpoints(base, experts, tmp_path / "out", "ties", scope="tensor", progress=False,
                      max_memory="8KB", exclude=["embed"])
    got = load_state_dict(tmp_path / "out")
    want = api.merge(load_state_dict(base), [load_state_dict(e) for e in experts], "ties",
                     scope="tensor", exclude=["embed"])
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("bad, options", [
    (float("nan"), {}), (float("inf"), {"trim": "exact"}),
    # the ranking reads no expert that keeps every entry: the span's own check names it
    (float("nan"), {"trim": "exact", "density": [0.3, 1.0]})])
def test_a_bad_value_is_named_and_nothing_is_left(tmp_path, bad, options):
    base = model(0, torch.float32)
    experts = [finetuned(base, s) for s in (1, 2)]
    experts[1]["embed.weight"][250, 3] = bad                     # in the key's last spans
    paths = [save_state_dict(sd, tmp_path / f"m{i}.safetensors")
             for i, sd in enumerate([base] + experts)]
    with pytest.raises(MergeInputError, match=r"embed\.weight.*m2\.safetensors.*contains "
                       + ("NaN" if bad != bad else "Inf")):
        merge_checkpoints(paths[0], paths[1:], tmp_path / "out", "ties", scope="tensor",
                          progress=False, max_memory="8KB", **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m{i}.safetensors" for i in range(3)]


def test_the_reference_backend_merges_whole_keys(tmp_path):
    """backend="reference" runs the literal per-key loop, which ranks a whole key: no spans."""
    base = model(0, torch.float32)
    experts = [finetuned(base, s) for s in (1, 2)]
    paths = [save_state_dict(sd, tmp_path / f"m{i}.safetensors")
             for i, sd in enumerate([base] + experts)]
    stats = merge_checkpoints(paths[0], paths[1:], tmp_path / "out", "ties", scope="tensor",
                              backend="reference", progress=False, max_memory="8KB")
    want = api.merge(base, experts, "ties", scope="tensor", backend="reference")
    got = load_state_dict(tmp_path / "out")
    assert stats["ranking_s"] == 0 and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{}, {"trim": "exact", "zero_sign": "plus"}])
def test_on_a_gpu_the_spans_agree_with_the_cpu(tmp_path, options):
    """Ranked and merged on the GPU (radix selection there; the exact trim by argsort, the
    compiled replay being CPU code): the same trims, so the same values up to the rounding of
    the GPU's sums. The integer key is copied as it is."""
    base = model(0, torch.float32)       # a wrong trim moves entries by ~1e-2, far above this
    experts = [finetuned(base, s) for s in (1, 2, 3)]
    paths = [save_state_dict(sd, tmp_path / f"m{i}.safetensors")
             for i, sd in enumerate([base] + experts)]
    stats = merge_checkpoints(paths[0], paths[1:], tmp_path / "gpu", "ties", scope="tensor",
                              device="cuda", max_gpu_memory="16KB", progress=False, **options)
    assert stats["ranking_s"] > 0
    got = load_state_dict(tmp_path / "gpu")
    want = api.merge(base, experts, "ties", scope="tensor", **options)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        diff = (got[key].double() - want[key].double()).abs().max()
        assert diff <= 1e-6 * want[key].double().abs().max(), key           # float32 rounding
