"""The embedded benchmark: the quick run end to end (through the CLI), what its numbers must show,
determinism and the training cache, and the data and model it is built on."""
import json
import math

import pytest
import torch

from scoremerge.cli import main
from scoremerge import api
from scoremerge.demo import DemoConfig, experiment, merge_variants, run_demo, run_experiment
from scoremerge.demo.checkpoints import cache_key, trained_models
from scoremerge.demo.data import (ANGLES, CANVAS, N_CLASSES, load_digits_tensors, rotated_domains,
                                  split_indices, transform, upright_train)
from scoremerge.demo.model import TinyViT, ViTConfig
from scoremerge.demo.train import Schedule
from scoremerge.methods.routing import routes_to_matrix


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--quick", "--out", str(root / "out"), "--cache", str(root / "cache")]
    assert main(argv) == 0
    return root, argv, json.loads((root / "out" / "results.json").read_text())


def n_test():
    return len(split_indices(len(load_digits_tensors()[1]), seed=0)[2])


def chance_bound(n):
    """Accuracy a chance-level classifier reaches with probability under 0.15% (3 sigma)."""
    p = 1 / N_CLASSES
    return p + 3 * math.sqrt(p * (1 - p) / n)


def test_quick_run_writes_every_method_and_domain(quick_run):
    root, _, results = quick_run
    domains = [str(a) for a in ANGLES]
    labels = {v.label for v in merge_variants()}
    assert {"score", "score:diag", "mean", "task_arithmetic", "ties", "magmax", "tsv", "iso_c",
            "iso_cts"} <= labels
    for section in ("merged", "tuned_alpha"):
        assert set(results[section]) == labels
        for row in results[section].values():
            assert sorted(row["accuracy"], key=int) == domains
    for row in results["reference"].values():
        assert sorted(row, key=int) == domains
    assert all(len(row["merge_seconds"]) == len(domains) for row in results["merged"].values())
    png = (root / "out" / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_experts_beat_the_base_on_their_own_domain(quick_run):
    _, _, results = quick_run
    ref = results["reference"]
    for angle in ref["base"]:
        assert ref["expert_in_domain"][angle] > ref["base"][angle] + 0.05, angle


def test_merged_models_are_above_chance_on_the_target(quick_run):
    """Every merged model beats chance on every held-out rotation by 3 sigma. Task arithmetic at
    alpha = 1 sums five task vectors and can fall to chance (README); its alpha is searched."""
    _, _, results = quick_run
    bound = chance_bound(n_test())
    for section in ("merged", "tuned_alpha"):
        for label, row in results[section].items():
            if section == "merged" and label == "task_arithmetic":
                continue
            for angle, acc in row["accuracy"].items():
                assert acc > bound, (section, label, angle, acc)


def test_online_section_covers_every_stream_and_beats_chance(quick_run):
    """Every held-out and mixed stream is scored for every method; the default online merger's
    mean over the streams beats chance by 3 sigma of the smallest stream, and every strategy's
    mean coefficients are convex combinations of the stream's source experts."""
    from scoremerge.demo.online import DEFAULT, LABELS, MIXED_PAIRS, ONLINE_VARIANTS
    root, _, results = quick_run
    online = results["online"]
    expected = [str(a) for a in ANGLES] + [f"{a}+{b}" for a, b in MIXED_PAIRS]
    assert list(online["streams"]) == expected
    for name, row in online["streams"].items():
        assert set(row["accuracy"]) == set(LABELS), name
        assert not set(row["held_out"]) & set(row["sources"]), name
        assert row["best_single_expert_source"] in row["sources"]
        assert set(row["coefficients"]) == set(row["merged_forwards"]) == set(ONLINE_VARIANTS)
        for coeffs in row["coefficients"].values():
            for group in ("encoder", "head"):
                assert len(coeffs[group]) == len(row["sources"])
                assert abs(sum(coeffs[group]) - 1) < 1e-5 and min(coeffs[group]) >= 0
    smallest = min(row["n"] for row in online["streams"].values())
    assert online["mean"][DEFAULT] > chance_bound(smallest)
    assert sorted(online["records"], key=int) == [str(a) for a in ANGLES]
    assert all(t > 0 for t in online["records"].values())
    png = (root / "out" / "online.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_alpha_is_chosen_from_the_grid_on_source_validation(quick_run):
    _, _, results = quick_run
    grid = results["config"]["alpha_grid"]
    for row in results["tuned_alpha"].values():
        assert set(row["alpha"].values()) <= set(grid)
        assert all(0 < v <= 1 for v in row["val_accuracy"].values())


def test_second_run_loads_the_cache_and_prints_the_same_table(quick_run, capsys):
    root, argv, first = quick_run
    assert main(argv) == 0
    second = json.loads((root / "out" / "results.json").read_text())
    assert second["training"]["trained"] == [] and len(second["training"]["loaded"]) == 7
    for section in ("reference", "expert_matrix"):
        assert second[section] == first[section]
    for section in ("merged", "tuned_alpha"):
        for label, row in first[section].items():
            assert second[section][label]["accuracy"] == row["accuracy"], label
    for name, row in first["online"]["streams"].items():
        assert second["online"]["streams"][name]["accuracy"] == row["accuracy"], name
    out = capsys.readouterr().out
    assert "score:diag" in out and "entropy (paper)" in out and "(default) +" in out


def test_reference_backend_gives_the_same_accuracies(quick_run):
    """The demo is the accuracy check for every merge backend: on the same cached experts, the
    plain-torch per-key reference and the default backend must classify the targets alike (one
    digit in a few hundred may flip, where float32 rounding moves a logit across a tie)."""
    root, _, fast = quick_run
    out = root / "reference"
    assert main(["demo", "--quick", "--no-tune-alpha", "--backend", "reference", "--out", str(out),
                 "--cache", str(root / "cache")]) == 0
    slow = json.loads((out / "results.json").read_text())
    assert slow["config"]["backend"] == "reference" and slow["tuned_alpha"] == {}
    for label, row in fast["merged"].items():
        for angle, acc in row["accuracy"].items():
            assert abs(slow["merged"][label]["accuracy"][angle] - acc) <= 1.01 / n_test(), \
                (label, angle)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_cuda_run_merges_the_same_experts_and_agrees_with_the_cpu(quick_run):
    root, _, cpu = quick_run
    out = root / "cuda"
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(out),
                 "--cache", str(root / "cache")]) == 0
    gpu = json.loads((out / "results.json").read_text())
    assert gpu["training"]["trained"] == []
    for section in ("merged", "tuned_alpha"):
        for label, row in cpu[section].items():
            for angle, acc in row["accuracy"].items():
                if section == "tuned_alpha" and gpu[section][label]["alpha"][angle] != \
                        row["alpha"][angle]:
                    continue                        # a near-tie on validation may pick another alpha
                assert abs(gpu[section][label]["accuracy"][angle] - acc) <= 1.01 / n_test(), \
                    (section, label, angle)
    for name, row in cpu["online"]["streams"].items():    # the CUDA mixing kernel, end to end
        for label, acc in row["accuracy"].items():
            assert abs(gpu["online"]["streams"][name]["accuracy"][label] - acc) <= 3.01 / row["n"], \
                (name, label)


def tiny_config(**kw):
    return DemoConfig(seed=3, angles=(0, 30, 60), vit=ViTConfig(dim=16, heads=2, mlp=16, depth=2),
                      base_schedule=Schedule(epochs=1, lr=1e-3, batch=256),
                      expert_schedule=Schedule(epochs=1, lr=1e-3, batch=256), **kw)


def test_alpha_search_sees_only_the_source_domains_validation_splits(monkeypatch):
    config = tiny_config(alpha_grid=(0.5, 1.0, 1.5))
    seen = []
    real = experiment._best_alpha

    def spy(model, base, tau, val, grid):
        seen.append(val)
        return real(model, base, tau, val, grid)
    monkeypatch.setattr(experiment, "_best_alpha", spy)
    results = run_experiment(config, cache_dir=None, log=lambda m: None)

    domains = {d.angle: d for d in rotated_domains(config.seed, config.angles)}
    n_variants = len(merge_variants())
    assert len(seen) == n_variants * len(config.angles)
    for i, target in enumerate(config.angles):
        sources = [a for a in config.angles if a != target]
        expected = torch.cat([domains[a].val.x for a in sources])
        for val in seen[i * n_variants:(i + 1) * n_variants]:
            assert torch.equal(val.x, expected), target

    # One entry recomputed by hand: mean merge for target 30, at the chosen alpha, on its sources.
    base, experts, _ = trained_models(config, upright_train(config.seed), domains.values(), None,
                                      log=lambda m: None)
    tau = api.merge_task_vectors(api.task_vectors(base, [experts[0], experts[60]]), "mean")
    row = results["tuned_alpha"]["mean"]
    alpha = row["alpha"][30]
    merged = {k: b + alpha * tau[k] if k in tau else b for k, b in base.items()}
    model = TinyViT(config.vit)
    model.load_state_dict(merged)
    with torch.no_grad():
        x = torch.cat([domains[0].val.x, domains[60].val.x])
        y = torch.cat([domains[0].val.y, domains[60].val.y])
        by_hand = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert row["val_accuracy"][30] == pytest.approx(by_hand, abs=1e-6)


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_run(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("read-only file system")
    monkeypatch.setattr("scoremerge.demo.checkpoints.save_state_dict", refuse)
    messages = []
    config = tiny_config()
    base, experts, info = trained_models(config, upright_train(config.seed),
                                         rotated_domains(config.seed, config.angles),
                                         tmp_path / "cache", log=messages.append)
    assert sorted(experts) == [0, 30, 60] and len(info["trained"]) == 4
    assert sum("could not cache" in m and "read-only" in m for m in messages) == 4


def test_training_is_deterministic_and_a_bad_cache_entry_is_retrained(tmp_path):
    """Same weights with or without the cache, whatever the caller's thread count."""
    config = tiny_config()
    upright = upright_train(config.seed)
    domains = rotated_domains(config.seed, config.angles)
    base1, experts1, info1 = trained_models(config, upright, domains, tmp_path, log=lambda m: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        base2, experts2, _ = trained_models(config, upright, domains, None, log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(base1[k], base2[k]) for k in base1)
    assert all(torch.equal(experts1[30][k], experts2[30][k]) for k in base1)
    assert not all(torch.equal(experts1[30][k], base1[k]) for k in base1)

    folder = tmp_path / cache_key(config.training_settings())
    assert sorted(p.name for p in folder.iterdir()) == ["base", "expert-0", "expert-30",
                                                          "expert-60"]
    shard = folder / "expert-30" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])                         # truncated on disk
    messages = []
    _, experts3, info3 = trained_models(config, upright, domains, tmp_path, log=messages.append)
    assert info3["trained"] == ["expert-30"] and info3["loaded"] == ["base", "expert-0",
                                                                     "expert-60"]
    assert "expert-30" in messages[0] and "retraining" in messages[0]
    assert all(torch.equal(experts1[30][k], experts3[30][k]) for k in base1)


def test_cache_key_changes_with_every_training_setting():
    a = DemoConfig()
    keys = {cache_key(c.training_settings()) for c in
            (a, DemoConfig(seed=1), DemoConfig(angles=(0, 15)), DemoConfig(vit=ViTConfig(dim=32)),
             DemoConfig(expert_schedule=Schedule(epochs=3, lr=1e-3)))}
    assert len(keys) == 5
    assert cache_key(DemoConfig(alpha=0.5).training_settings()) == cache_key(a.training_settings())


def test_several_seeds_report_the_mean_and_spread_of_each_accuracy(tmp_path):
    """run_demo(seeds=2) runs seeds 3 and 4; every summarised accuracy is the mean of the two
    runs', its spread their standard deviation; the tables print both."""
    lines = []
    results = run_demo(tiny_config(alpha_grid=(0.5, 1.0)), out=tmp_path / "out", cache_dir=None,
                       log=lines.append, seeds=2)
    assert results["seeds"] == [3, 4] and [r["config"]["seed"] for r in results["runs"]] == [3, 4]
    summary, spread, runs = results["summary"], results["spread"], results["runs"]
    for angle in (0, 30, 60):
        pair = [r["merged"]["score"]["accuracy"][angle] for r in runs]
        assert summary["merged"]["score"]["accuracy"][angle] == pytest.approx(sum(pair) / 2)
        assert spread["merged"]["score"]["accuracy"][angle] == pytest.approx(
            abs(pair[0] - pair[1]) / math.sqrt(2))
    means = [r["merged"]["mean"]["mean"] for r in runs]
    assert spread["merged"]["mean"]["mean"] == pytest.approx(
        abs(means[0] - means[1]) / math.sqrt(2))
    for name, row in summary["online"]["streams"].items():
        for key, acc in row["accuracy"].items():
            pair = [r["online"]["streams"][name]["accuracy"][key] for r in runs]
            assert acc == pytest.approx(sum(pair) / 2), (name, key)
            assert spread["online"]["streams"][name][key] == pytest.approx(
                abs(pair[0] - pair[1]) / math.sqrt(2)), (name, key)
    alphas = summary["tuned_alpha"]["mean"]["alpha"]
    assert len(alphas) == 6 and set(alphas.values()) <= {0.5, 1.0}
    text = "\n".join(lines)
    assert "mean +- sd over seeds 3-4" in text and "\u00b1" in text
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["seeds"] == [3, 4] and len(saved["runs"]) == 2
    for png in ("accuracy.png", "online.png"):
        assert (tmp_path / "out" / png).read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds"),
    (["--cache", "c", "--no-cache"], "contradict"),
    (["--cache", ""], "needs a folder"),
    (["--device", "nonsense"], "not a torch device"),
    (["--device", "cpu", "--backend", "cuda"], "backend 'cuda'"),
    (["--cache", "{tmp}/a-file"], "not a folder"),
])
def test_demo_bad_arguments_exit_2_before_any_training(tmp_path, capsys, argv, message):
    (tmp_path / "a-file").write_text("keep me")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["demo", "--quick", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert (tmp_path / "a-file").read_text() == "keep me"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_on_cuda_without_a_gpu_says_so(tmp_path, capsys):
    assert main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("keep me")
    assert main(["demo", "--quick", "--no-cache", "--out", str(tmp_path / "f")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "keep me"


def test_domains_share_one_split_and_test_digits_are_never_trained_on():
    images, labels = load_digits_tensors()
    assert images.shape == (1797, 1, CANVAS, CANVAS) and 0 <= images.min() and images.max() <= 1
    train, val, test = split_indices(len(labels), seed=0)
    assert len(set(train.tolist()) | set(val.tolist()) | set(test.tolist())) == len(labels)
    assert len(train) + len(val) + len(test) == len(labels)
    domains = rotated_domains(0, (0, 45))
    assert torch.equal(domains[0].test.y, domains[1].test.y) and torch.equal(domains[0].test.y,
                                                                           labels[test])
    assert torch.allclose(domains[0].train.x, images[train], atol=1e-6)   # 0 degrees is identity
    assert not torch.allclose(domains[1].train.x, images[train], atol=0.1)
    assert torch.equal(upright_train(0).x, images[train])
    assert not torch.equal(split_indices(len(labels), seed=1)[2], test)


def test_rotation_turns_counter_clockwise_and_keeps_the_digit_on_the_canvas():
    x = torch.zeros(1, 1, CANVAS, CANVAS)
    x[0, 0, 5:7, CANVAS - 2] = 1                         # a mark at the right edge, mid-height
    rows, cols = (transform(x, 90.0)[0, 0] > 0.3).nonzero(as_tuple=True)
    assert rows.max() < 3 and cols.min() >= 5 and cols.max() <= 6      # moved to the top edge
    images, _ = load_digits_tensors()
    for angle in ANGLES:                     # bilinear sampling blurs; the ink stays on the canvas
        kept = transform(images, angle).sum() / images.sum()
        assert kept > 0.97, (angle, kept)


def test_tiny_vit_has_real_attention_and_mlp_matrices():
    config = ViTConfig()
    model = TinyViT(config)
    logits = model(torch.rand(3, 1, CANVAS, CANVAS))
    assert logits.shape == (3, N_CLASSES)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d = config.dim
    assert shapes["blocks.1.attn.qkv.weight"] == (3 * d, d)
    assert shapes["blocks.0.mlp.fc2.weight"] == (d, config.mlp)
    assert {"blocks.0.norm1.weight", "blocks.0.attn.proj.bias", "pos_embed", "cls_token",
            "head.weight"} <= set(shapes)
    matrix = {k for k, s in shapes.items() if routes_to_matrix(s, k, 5, [])}
    assert {"blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "head.weight"} <= matrix
    assert "pos_embed" not in matrix and "blocks.0.norm1.weight" not in matrix
