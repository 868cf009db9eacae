"""LoRA merges file to file: adapter folders read under io.access's rules and refused by name
when they are not plain LoRA, the merged model or adapter written as every merge writes."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from scoremerge import MergeInputError
from scoremerge.io import load_state_dict, save_state_dict
from scoremerge.io.checkpoint import Checkpoint
from scoremerge.lora import (LowRank, MergedAdapter, Target, experts_are_adapters, load_adapter,
                             merge_adapter_checkpoints, merge_adapters, save_adapter)

SHAPES = {"layers.0.q.weight": (24, 16), "layers.0.up.weight": (40, 16),
          "layers.1.q.weight": (24, 16), "embed.weight": (30, 16)}


@pytest.fixture
def files(tmp_path):
    """A base folder (with a config.json side file) and three adapter folders of ranks 2, 3, 4,
    the last in bfloat16, the second without layers.1.q."""
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    base.update({"norm.weight": torch.ones(16), "position_ids": torch.arange(8)})
    save_state_dict(base, tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text("{}")
    for i, r in enumerate((2, 3, 4)):
        updates = {k: LowRank(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g))
                   for k, (m, n) in SHAPES.items() if not (i == 1 and k == "layers.1.q.weight")}
        targets = {k: Target(k.removesuffix(".weight"), embedding=k == "embed.weight",
                             transposed=k == "embed.weight") for k in updates}
        save_adapter(MergedAdapter(updates, targets), tmp_path / f"lora{i}",
                     dtype=torch.bfloat16 if i == 2 else None)
    return tmp_path, base, [tmp_path / f"lora{i}" for i in range(3)]


def _edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _edit_weights(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_full_output_is_the_in_memory_merge(files):
    root, base, loras = files
    stats = merge_adapter_checkpoints(root / "base", loras, root / "out", "score", alpha=0.5)
    written = load_state_dict(root / "out")
    want = merge_adapters(base, [load_adapter(p, base) for p in loras], "score", alpha=0.5)
    assert set(written) == set(base) and stats["keys"] == len(SHAPES)
    for key, value in written.items():
        assert torch.equal(value, want[key] if key in want else base[key]), key
    assert (root / "out" / "config.json").is_file()


def test_adapter_output_reads_back_and_truncates(files):
    root, base, loras = files
    experts = [load_adapter(p, base) for p in loras]
    merge_adapter_checkpoints(root / "base", loras, root / "ad", "tsv", output="adapter")
    back = load_adapter(root / "ad", base)
    want = merge_adapters(base, experts, "tsv", output="adapter")
    assert back.targets == want.targets and back.targets["embed.weight"].embedding
    for key, update in want.updates.items():
        assert torch.equal(back.updates[key].materialize(), update.materialize()), key
    stats = merge_adapter_checkpoints(root / "base", loras, root / "ad2", "tsv", output="adapter",
                                      rank=2)
    assert stats["rank"] == 2 and 0 < stats["max_error"] < 1


def test_overwrite_replaces_only_a_previous_merge(files):
    root, _, loras = files
    for output in ("full", "adapter"):
        out = root / f"out_{output}"
        merge_adapter_checkpoints(root / "base", loras, out, "mean", output=output)
        with pytest.raises(MergeInputError, match="not empty"):
            merge_adapter_checkpoints(root / "base", loras, out, "mean", output=output)
        merge_adapter_checkpoints(root / "base", loras, out, "mean", output=output, overwrite=True)
        (out / "notes.txt").write_text("mine")
        with pytest.raises(MergeInputError, match="notes.txt"):
            merge_adapter_checkpoints(root / "base", loras, out, "mean", output=output,
                                      overwrite=True)
        assert (out / "notes.txt").read_text() == "mine"


def test_output_may_not_touch_an_input(files):
    root, _, loras = files
    with pytest.raises(MergeInputError, match="is inside the input"):
        merge_adapter_checkpoints(root / "base", loras, loras[0] / "merged", "mean")
    with pytest.raises(MergeInputError, match="is the input"):
        merge_adapter_checkpoints(root / "base", loras, loras[1], "mean", output="adapter",
                                  overwrite=True)


def test_adapters_and_full_models_are_not_mixed(files):
    root, _, loras = files
    assert experts_are_adapters(loras) and not experts_are_adapters([root / "base"])
    assert experts_are_adapters([loras[0] / "adapter_model.safetensors"])
    with pytest.raises(MergeInputError, match="mix LoRA adapters"):
        experts_are_adapters([loras[0], root / "base"])


def test_bin_adapter_is_read_with_weights_only(files):
    root, base, loras = files
    want = load_adapter(loras[0], base)
    tensors = load_file(loras[0] / "adapter_model.safetensors")
    (loras[0] / "adapter_model.safetensors").unlink()
    torch.save(tensors, loras[0] / "adapter_model.bin")
    got = load_adapter(loras[0], base)
    assert all(torch.equal(got.updates[k].B, u.B) for k, u in want.updates.items())
    torch.save({"factors": tensors, "step": 3}, loras[0] / "adapter_model.bin")
    with pytest.raises(MergeInputError, match="not tensors"):
        load_adapter(loras[0], base)


@pytest.mark.parametrize("changes,match", [
    ({"use_dora": True}, "use_dora=True"), ({"modules_to_save": ["head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias='all'"), ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"lora_bias": True}, "lora_bias"), ({"future_variant": {"on": 1}}, "unknown field"),
    ({"alora_invocation_tokens": [5]}, "activated LoRA"),
    ({"r": 7, "rank_pattern": {}}, "gives rank 7"),
    ({"rank_pattern": {"layers[": 3}}, "not a regular expression"),
    ({"lora_alpha": "big"}, "lora_alpha a finite number")])
def test_unsupported_configs_are_refused_by_name(files, changes, match):
    root, base, loras = files
    _edit_config(loras[0], **changes)
    with pytest.raises(MergeInputError, match=match):
        load_adapter(loras[0], base)


@pytest.mark.parametrize("change,match", [
    (lambda t: t.update({"base_model.model.layers.0.q.lora_magnitude_vector": torch.ones(24)}),
     "not a LoRA factor"),
    (lambda t: t.update({"layers.0.q.lora_A.weight": torch.ones(2, 16)}), "does not start with"),
    (lambda t: t.pop("base_model.model.layers.0.q.lora_B.weight"), "has only lora_A"),
    (lambda t: t.update({"base_model.model.missing.lora_A.weight": torch.ones(2, 16),
                         "base_model.model.missing.lora_B.weight": torch.ones(24, 2)}),
     "the base does not have"),
    (lambda t: t.update({"base_model.model.layers.0.q.lora_B.weight": torch.ones(25, 2)}),
     r"is \[25, 16\], the base weight is \[24, 16\]"),
    (lambda t: t.update({"base_model.model.layers.0.q.lora_A.weight": torch.ones(2, 16, 1, 1)}),
     "conv LoRA")])
def test_bad_adapter_files_are_refused_by_name(files, change, match):
    root, base, loras = files
    _edit_weights(loras[0], change)
    with pytest.raises(MergeInputError, match=match):
        load_adapter(loras[0], base)


def test_a_saved_base_layer_must_equal_the_base(files):
    root, base, loras = files
    _edit_weights(loras[0], lambda t: t.update(
        {"base_model.model.embed.base_layer.weight": base["embed.weight"].clone()}))
    merge_adapter_checkpoints(root / "base", loras, root / "ok", "mean", output="adapter")
    _edit_weights(loras[0], lambda t: t.update(
        {"base_model.model.embed.base_layer.weight": base["embed.weight"] + 1}))
    for output in ("full", "adapter"):
        with pytest.raises(MergeInputError, match="differs from the base"):
            merge_adapter_checkpoints(root / "base", loras, root / output, "mean", output=output)


def test_weights_linked_from_outside_the_folder_are_refused(files, tmp_path):
    root, base, loras = files
    elsewhere = tmp_path / "elsewhere.safetensors"
    (loras[0] / "adapter_model.safetensors").rename(elsewhere)
    (loras[0] / "adapter_model.safetensors").symlink_to(elsewhere)
    with pytest.raises(MergeInputError, match="outside the checkpoint folder"):
        load_adapter(loras[0], base)


def test_a_named_weights_file_is_the_one_read(files):
    root, base, loras = files
    tensors = load_file(loras[0] / "adapter_model.safetensors")
    torch.save({k: 2 * v if k.endswith(("lora_B.weight", "lora_embedding_B")) else v
                for k, v in tensors.items()},
               loras[0] / "adapter_model.bin")
    folder = load_adapter(loras[0], base)                        # PEFT's order: safetensors
    named = load_adapter(loras[0] / "adapter_model.bin", base)
    for key, update in folder.updates.items():
        assert torch.equal(named.updates[key].materialize(), 2 * update.materialize()), key


def test_non_finite_factors_and_shape_only_bases_are_refused(files):
    root, base, loras = files
    with Checkpoint(root / "base") as checkpoint:
        infos = checkpoint.infos
    expert = load_adapter(loras[0], infos)
    with pytest.raises(MergeInputError, match="needs the base's tensors"):
        merge_adapters(infos, [expert], "mean")
    _edit_weights(loras[0], lambda t: t["base_model.model.layers.0.q.lora_A.weight"].fill_(
        float("nan")))
    with pytest.raises(MergeInputError, match="contain NaN or Inf"):
        load_adapter(loras[0], base)


def _cli(capsys, *argv):
    from scoremerge.cli import main
    code = main(["merge", *map(str, argv)])
    return code, capsys.readouterr()


def test_cli_merges_adapters_into_a_model_and_into_an_adapter(files, capsys):
    root, base, loras = files
    code, out = _cli(capsys, "--base", root / "base", "--experts", *loras, "--method", "score",
                     "--alpha", "0.5", "--out", root / "model", "--no-progress")
    assert code == 0 and "3 LoRA experts" in out.out, out.err
    want = merge_adapters(base, [load_adapter(p, base) for p in loras], "score", alpha=0.5)
    written = load_state_dict(root / "model")
    assert all(torch.equal(written[k], v) for k, v in want.items())
    code, out = _cli(capsys, "--base", root / "base", "--experts", *loras, "--method", "tsv",
                     "--out-adapter", root / "ad", "--adapter-rank", "3")
    assert code == 0 and "truncation error" in out.out, out.err
    back = load_adapter(root / "ad", base)
    assert max(u.rank for u in back.updates.values()) == 3


@pytest.mark.parametrize("extra, match", [
    (["--out", "X", "--out-adapter", "Y"], "not both"),
    ([], "--out is required"),
    (["--out", "X", "--adapter-rank", "2"], "--adapter-rank truncates"),
    (["--out", "X", "--stream"], "--stream is not supported"),
    (["--out", "X", "--device", "cuda"], "--device"),    # no CUDA here, or CPU only
    (["--out-adapter", "X", "--method", "ties", "--option", "scope=tensor"], "not low rank"),
    (["--out-adapter", "X", "--adapter-rank", "0"], "positive integer"),
])
def test_cli_refuses_what_a_lora_merge_cannot_do(files, capsys, extra, match):
    root, _, loras = files
    extra = [str(root / e) if e in ("X", "Y") else e for e in extra]
    code, out = _cli(capsys, "--base", root / "base", "--experts", *loras, *extra)
    assert code == 2 and match in out.err, out.err
    assert not (root / "X").exists() and not (root / "Y").exists()


def test_cli_out_adapter_needs_adapters(files, capsys):
    root, _, _ = files
    code, out = _cli(capsys, "--base", root / "base", "--experts", root / "base", root / "base",
                     "--out-adapter", root / "X")
    assert code == 2 and "needs LoRA adapters" in out.err
