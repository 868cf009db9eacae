"""scoremerge's FusionBench classes against FusionBench 0.2.33's own, on the same model pools.

Each pool is a small ViT-like module in float64 (odd sizes, a 4-D patch embedding, 3-D tokens,
a [2, d] head with fewer rows than tasks, an excluded key) with fresh random experts, at T = 3
and 4. FusionBench's classes change the pretrained model in place, so every run gets its own.
"""
import contextlib
import copy
import importlib.metadata
import io
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

try:
    import fusion_bench  # noqa: F401
except ModuleNotFoundError:
    if "CI" in os.environ:                     # CI installs the test extra: missing is a failure
        raise
    pytest.skip("fusion-bench is not installed (the `test` extra pins fusion-bench==0.2.33)",
                allow_module_level=True)

import fusion_bench.method as fb
from fusion_bench import BaseModelPool
from fusion_bench.constants.paths import PROJECT_ROOT_PATH
from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging
from fusion_bench.utils import instantiate
from fusion_bench.utils.instantiate_utils import set_print_function_call
from omegaconf import OmegaConf

import scoremerge
import scoremerge.integrations.fusion_bench as sm

from conftest import rel_err

EXCLUDED = ["text_projection.weight"]
THIN = ["head.weight", "aux_head.weight"]        # [2, d] and [3, d]: thinner than T = 3 or 4


class Block(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)


class TinyViT(nn.Module):
    """timm's key names (blocks.0.attn.qkv.weight, ...) and a CLIP-style text projection; the
    width, MLP width and patch size are odd."""

    def __init__(self, d=19, hidden=45, patch=3):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, 10, d))
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.blocks = nn.ModuleList([Block(d, hidden)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 2)
        self.aux_head = nn.Linear(d, 3)
        self.text_projection = nn.Linear(d, 11, bias=False)


def make_models(T, seed, values=None):
    """{"_pretrained_": base, "t0": ..., ...}; values(shape, generator) draws each expert's update
    (default: Gaussian, so no two entries tie)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    base = TinyViT().double()
    draw = values or (lambda shape, gen: 0.1 * torch.randn(shape, generator=gen,
                                                           dtype=torch.float64))
    models = {"_pretrained_": base}
    for t in range(T):
        expert = copy.deepcopy(base)
        for p in expert.parameters():
            p.data += draw(p.shape, g)
        models[f"t{t}"] = expert
    return models


def merged_update(algorithm, models):
    """The merged state dict minus the pretrained one, from a fresh copy of the pool."""
    pool = BaseModelPool({name: copy.deepcopy(m) for name, m in models.items()})
    base = {k: v.clone() for k, v in models["_pretrained_"].state_dict().items()}
    with contextlib.redirect_stdout(io.StringIO()):      # FusionBench prints every key
        merged = algorithm.run(pool).state_dict()
    return {k: merged[k] - base[k] for k in base}, merged


@pytest.fixture(autouse=True, scope="module")
def quiet_fusion_bench():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_the_pinned_version_is_installed():
    assert importlib.metadata.version("fusion-bench") == "0.2.33"


ALPHAS = [0.5, 1.0, 1.5, 2.0]
SVD_CASES = {      # T -> (FusionBench's algorithm, scoremerge's)
    "tsv": lambda T: (
        fb.TaskSingularVectorMerging(alpha=0.7, exclude_keys=EXCLUDED),
        sm.TaskSingularVectorMerging(alpha=0.7, exclude_keys=EXCLUDED, fusion_bench_compat=True)),
    "tsv_alpha_per_task": lambda T: (
        fb.TaskSingularVectorMerging(alpha=ALPHAS[:T], exclude_keys=EXCLUDED),
        sm.TaskSingularVectorMerging(alpha=ALPHAS[:T], exclude_keys=EXCLUDED,
                                     fusion_bench_compat=True)),
    "iso_c": lambda T: (fb.ISO_C_Merge(scaling_factor=0.9, exclude_keys=EXCLUDED),
                        sm.ISO_C_Merge(scaling_factor=0.9, exclude_keys=EXCLUDED)),
    "iso_cts": lambda T: (
        fb.ISO_CTS_Merge(scaling_factor=0.9, common_space_fraction=0.8, exclude_keys=EXCLUDED),
        sm.ISO_CTS_Merge(scaling_factor=0.9, common_space_fraction=0.8, exclude_keys=EXCLUDED)),
}


@pytest.mark.parametrize("T", [3, 4])
@pytest.mark.parametrize("case", list(SVD_CASES))
def test_svd_methods_match_fusion_bench(case, T):
    """Every key, the thin ones included (Iso merges them isotropically, TSV-M in compatibility
    mode zeroes them), to 1e-6 relative on the merged update."""
    models = make_models(T, seed=10 * T + len(case))
    theirs, ours = SVD_CASES[case](T)
    want, _ = merged_update(theirs, models)
    got, _ = merged_update(ours, models)
    for key in want:
        assert rel_err(got[key], want[key]) < 1e-6, key


@pytest.mark.parametrize("T", [3, 4])
def test_tsv_default_takes_the_mean_where_fusion_bench_zeroes(T):
    models = make_models(T, seed=T)
    want, _ = merged_update(fb.TaskSingularVectorMerging(exclude_keys=EXCLUDED), models)
    got, _ = merged_update(sm.TaskSingularVectorMerging(exclude_keys=EXCLUDED), models)
    base = models["_pretrained_"].state_dict()
    for key in want:
        if key in THIN and min(want[key].shape) < T:
            mean = sum(models[f"t{t}"].state_dict()[key] - base[key] for t in range(T)) / T
            assert torch.equal(want[key], torch.zeros_like(mean))
            assert rel_err(got[key], mean) < 1e-12, key
        else:
            assert rel_err(got[key], want[key]) < 1e-6, key


def _ties(merge_func, threshold):
    return (fb.TiesMergingAlgorithm(scaling_factor=0.3, threshold=threshold, remove_keys=[],
                                    merge_func=merge_func),
            sm.TiesMergingAlgorithm(scaling_factor=0.3, threshold=threshold, remove_keys=[],
                                    merge_func=merge_func, fusion_bench_compat=True))


EXACT_CASES = {
    "ties_sum": lambda: _ties("sum", 20),            # FusionBench's config: a percentage
    "ties_mean": lambda: _ties("mean", 0.2),
    "ties_max": lambda: _ties("max", 0.37),
    "task_arithmetic": lambda: (fb.TaskArithmeticAlgorithm(scaling_factor=0.3),
                                sm.TaskArithmeticAlgorithm(scaling_factor=0.3)),
    "magmax": lambda: (fb.MagMaxAlgorithm(scaling_factor=0.3),
                       sm.MagMaxAlgorithm(scaling_factor=0.3)),
}


@pytest.mark.parametrize("T", [3, 4])
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_entrywise_methods_equal_fusion_bench_to_the_bit(case, T):
    models = make_models(T, seed=T)
    theirs, ours = EXACT_CASES[case]()
    _, want = merged_update(theirs, models)
    _, got = merged_update(ours, models)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def eighths(shape, g):
    """Updates of -2..2 eighths: exact in float64, so equal magnitudes and exact cancellations
    (as in bf16 checkpoints) abound."""
    return torch.randint(-2, 3, shape, generator=g).double() / 8


def test_magmax_ties_go_to_the_later_task_as_in_fusion_bench():
    models = make_models(3, seed=5, values=eighths)
    want, _ = merged_update(fb.MagMaxAlgorithm(scaling_factor=1.0), models)
    got, _ = merged_update(sm.MagMaxAlgorithm(scaling_factor=1.0), models)
    base = models["_pretrained_"].state_dict()
    key = "blocks.0.attn.qkv.weight"
    taus = torch.stack([models[f"t{t}"].state_dict()[key] - base[key] for t in range(3)]).abs()
    top2 = taus.topk(2, dim=0).values
    assert (top2[0] == top2[1]).sum() > 100                  # many ties to break
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("merge_func", ["mean", "sum", "max"])
def test_ties_compat_on_quantized_updates_equals_fusion_bench(merge_func):
    """Kept values that cancel exactly take the majority sign, entries tied with the threshold
    are all kept: in compatibility mode, as FusionBench does."""
    models = make_models(4, seed=9, values=eighths)
    theirs, ours = _ties(merge_func, 0.5)
    _, want = merged_update(theirs, models)
    _, got = merged_update(ours, models)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("merge_func", ["mean", "sum"])
def test_ties_with_removed_keys_matches_fusion_bench_on_the_rest(merge_func):
    """FusionBench's class cannot load its own result when remove_keys is set (the removed keys
    are missing from the state dict), so compare with its ties_merging on the flattened rest;
    scoremerge merges the removed keys by the mean."""
    models = make_models(3, seed=7)
    base = models["_pretrained_"].state_dict()
    keys = sorted(k for k in base if k not in EXCLUDED)
    flat = torch.stack([torch.cat([(models[f"t{t}"].state_dict()[k] - base[k]).flatten()
                                   for k in keys]) for t in range(3)])
    with contextlib.redirect_stdout(io.StringIO()):
        merged = ties_merging(flat, reset_thresh=0.2, merge_func=merge_func)
    ours = sm.TiesMergingAlgorithm(scaling_factor=1.0, threshold=0.2, remove_keys=EXCLUDED,
                                   merge_func=merge_func, fusion_bench_compat=True)
    update, got = merged_update(ours, models)
    for key, tau in zip(keys, merged.split([base[k].numel() for k in keys])):
        assert torch.equal(got[key].flatten(), base[key].flatten() + 1.0 * tau), key
    mean = sum(models[f"t{t}"].state_dict()[EXCLUDED[0]] - base[EXCLUDED[0]] for t in range(3)) / 3
    assert rel_err(update[EXCLUDED[0]], mean) < 1e-12


def test_ties_defaults_are_the_papers():
    """Without fusion_bench_compat the class is scoremerge's ties with density = threshold."""
    models = make_models(3, seed=8)
    base = models["_pretrained_"].state_dict()
    taus = scoremerge.task_vectors(base, [models[f"t{t}"].state_dict() for t in range(3)])
    tau = scoremerge.merge_task_vectors(taus, "ties", density=0.2)
    _, got = merged_update(sm.TiesMergingAlgorithm(scaling_factor=0.3, threshold=20), models)
    for key in base:
        assert torch.equal(got[key], base[key] + 0.3 * tau[key]), key


FUSION_BENCH_CONFIGS = {"tsv": "task_singular_vector/TaskSingularVectorMerging.yaml",
                        "iso_c": "isotropic_merging/iso_c.yaml",
                        "iso_cts": "isotropic_merging/iso_cts.yaml", "ties": "ties_merging.yaml",
                        "task_arithmetic": "task_arithmetic.yaml", "magmax": "magmax/magmax.yaml"}


@pytest.mark.parametrize("name", list(FUSION_BENCH_CONFIGS))
def test_a_target_swap_is_the_whole_migration(name):
    """FusionBench's own config with only `_target_` changed builds scoremerge's class, and the
    shipped config builds the same class and accepts every key of FusionBench's."""
    theirs = OmegaConf.load(PROJECT_ROOT_PATH / "fusion_bench_config" / "method"
                            / FUSION_BENCH_CONFIGS[name])
    theirs._target_ = "scoremerge.integrations.fusion_bench." + theirs._target_.rsplit(".", 1)[1]
    ours = OmegaConf.load(sm.CONFIG_DIR / "method" / "scoremerge" / f"{name}.yaml")
    with set_print_function_call(False):
        swapped, shipped = instantiate(theirs), instantiate(ours)
    assert type(swapped) is type(shipped) and shipped.method == name
    assert set(theirs) <= set(ours)


def test_shipped_score_config_builds_score():
    with set_print_function_call(False):
        algorithm = instantiate(OmegaConf.load(sm.CONFIG_DIR / "method" / "scoremerge"
                                               / "score.yaml"))
    assert isinstance(algorithm, sm.ScoreMergingAlgorithm) and algorithm.variant == "full"


FACTORY = """
import torch
from torch import nn


def model(seed):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.data += 0.1 * seed * torch.randn(p.shape, generator=g, dtype=p.dtype)
    return m
"""
POOL = """_target_: fusion_bench.modelpool.BaseModelPool
models:
""" + "".join(f"  {n}: {{_target_: tiny_factory.model, seed: {s}}}\n"
              for n, s in (("_pretrained_", 0), ("a", 1), ("b", 2), ("c", 3)))


def test_fusion_bench_command_line_runs_the_shipped_config(tmp_path, monkeypatch):
    """The README's command: fusion_bench --config-dir <CONFIG_DIR> method=scoremerge/ties."""
    (tmp_path / "tiny_factory.py").write_text(FACTORY)
    (tmp_path / "cfg" / "modelpool").mkdir(parents=True)
    (tmp_path / "cfg" / "modelpool" / "tiny.yaml").write_text(POOL)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    out = tmp_path / "merged.pt"
    subprocess.run([sys.executable, "-m", "fusion_bench", "--config-dir", str(sm.CONFIG_DIR),
                    f"hydra.searchpath=[file://{tmp_path}/cfg]", "method=scoremerge/ties",
                    "method.merge_func=sum", "method.fusion_bench_compat=true", "modelpool=tiny",
                    "taskpool=dummy", f"merged_model_save_path={out}",
                    f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=600)     # a hang guard; quiet: ~8 s
    monkeypatch.syspath_prepend(str(tmp_path))
    import tiny_factory
    models = {n: tiny_factory.model(s)
              for n, s in (("_pretrained_", 0), ("a", 1), ("b", 2), ("c", 3))}
    theirs = fb.TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[],
                                     merge_func="sum")
    _, want = merged_update(theirs, models)
    got = torch.load(out, weights_only=True)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_dict_pool_works_and_a_bad_model_is_named():
    models = make_models(3, seed=11)
    _, want = merged_update(fb.TaskArithmeticAlgorithm(scaling_factor=0.5), models)
    got = sm.TaskArithmeticAlgorithm(scaling_factor=0.5, inplace=False).run(
        {name: copy.deepcopy(m) for name, m in models.items()}).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        models["t1"].norm.weight[3] = float("nan")
    with pytest.raises(scoremerge.MergeInputError, match="'t1'.*NaN"):
        sm.TaskArithmeticAlgorithm(scaling_factor=0.5).run(models)
    with pytest.raises(NotImplementedError, match="return_single_task_models"):
        sm.TaskSingularVectorMerging(return_single_task_models=True)
