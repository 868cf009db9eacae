"""scoremerge.lora against the real PEFT: adapters written by
peft.get_peft_model(...).save_pretrained are read as exactly the update PEFT's merge_and_unload
adds, and the merged adapter scoremerge writes loads in PeftModel.from_pretrained and gives
scoremerge's merged weights and outputs."""
import os

import pytest
import torch

try:
    import peft
    import transformers
except ModuleNotFoundError:
    if "CI" in os.environ:                     # CI installs the test extra: missing is a failure
        raise
    pytest.skip("peft or transformers is not installed (the `test` extra pins peft==0.21.2 "
                "and transformers==5.24.0)", allow_module_level=True)

from scoremerge.io.checkpoint import Checkpoint  # noqa: E402
from scoremerge.lora import (LowRank, load_adapter, merge_adapter_checkpoints,  # noqa: E402
                             merge_adapters, reference, save_adapter)

from conftest import rel_err  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=50)
# Different ranks, a rank and an alpha pattern, an embedding target, rsLoRA, disjoint targets.
LORAS = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
              rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 3}),
         dict(r=5, lora_alpha=7, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj",
                                                                   "up_proj"]),
         dict(r=3, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"])]


def _model(kind):
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16, bos_token_id=0,
        eos_token_id=0))


def _train_like(folder, base_dir, cls, lora, seed):
    """An adapter with non-zero random factors, saved by PEFT; returns the weights PEFT's
    merge_and_unload gives."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(cls.from_pretrained(base_dir),
                                peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Base folders and PEFT adapters: three on a tiny Llama, one on a tiny GPT-2 (Conv1D,
    fan_in_fan_out)."""
    root = tmp_path_factory.mktemp("peft")
    out = {"root": root}
    for kind in ("llama", "gpt2"):
        torch.manual_seed(0)
        model = _model(kind)
        model.save_pretrained(root / kind)
        out[kind] = {k: v.clone() for k, v in model.state_dict().items()}
    cls = transformers.LlamaForCausalLM
    out["merged"] = [_train_like(root / f"lora{i}", root / "llama", cls, lora, 10 + i)
                     for i, lora in enumerate(LORAS)]
    out["gpt2_merged"] = _train_like(
        root / "gpt2_lora", root / "gpt2", transformers.GPT2LMHeadModel,
        dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"]), 20)
    return out


def _check_peft_weights(updates, base, merged):
    """Every key PEFT changed has one of `updates`, which PEFT added to the base within the
    rounding of its float32 factors, product and sum; every other key is untouched."""
    for key, weight in merged.items():
        if key not in updates:
            assert torch.equal(weight, base[key]), key
            continue
        delta = updates[key].materialize(torch.float64)
        bound = 4 * EPS32 * (base[key].abs().max() + delta.abs().max() * updates[key].rank)
        assert (weight.double() - base[key].double() - delta).abs().max() <= bound, key


@pytest.mark.parametrize("i", range(len(LORAS)))
def test_reading_equals_peft_merge_and_unload(zoo, i):
    adapter = load_adapter(zoo["root"] / f"lora{i}", Checkpoint(zoo["root"] / "llama").infos)
    _check_peft_weights(adapter.updates, zoo["llama"], zoo["merged"][i])
    if i == 0:          # PEFT saved the adapted embedding's base layer: recorded, equal to base
        assert list(adapter.base_copies) == ["model.embed_tokens.weight"]
        assert adapter.targets["model.embed_tokens.weight"].embedding


def test_fan_in_fan_out_conv1d_reads_transposed(zoo):
    adapter = load_adapter(zoo["root"] / "gpt2_lora", zoo["gpt2"])
    assert adapter.config["fan_in_fan_out"] and all(t.transposed for t in adapter.targets.values())
    _check_peft_weights(adapter.updates, zoo["gpt2"], zoo["gpt2_merged"])


def _peft_merged(base_dir, cls, adapter_dir):
    """PEFT's logits on a fixed batch with the adapter unmerged and merged, its merged weights,
    and the batch."""
    model = peft.PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter_dir)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(tokens).logits
        model = model.merge_and_unload()
        merged = model(tokens).logits
    return (unmerged, merged), model.state_dict(), tokens


def _float64(updates):
    return {k: LowRank(u.B.double(), u.A.double(), u.scaling) for k, u in updates.items()}


@pytest.mark.parametrize("method,rank", [("score", None), ("iso_cts", None),
                                         ("task_arithmetic", 4)])
def test_written_adapter_loads_in_peft_and_gives_the_merge(zoo, method, rank, tmp_path):
    """The adapter scoremerge writes is what PEFT merges; with no truncation it is the dense
    merge; the full model scoremerge writes gives PEFT's outputs (within PEFT's own difference
    between its unmerged and merged outputs)."""
    root, base = zoo["root"], zoo["llama"]
    experts = [load_adapter(root / f"lora{i}", base) for i in range(len(LORAS))]
    merged = merge_adapters(base, experts, method, alpha=0.8, output="adapter", rank=rank,
                            dtype="float64")
    save_adapter(merged, tmp_path / "merged", like=experts[0].config, dtype=torch.float32)
    (unmerged, peft_merged), weights, tokens = _peft_merged(
        root / "llama", transformers.LlamaForCausalLM, tmp_path / "merged")
    _check_peft_weights(merged.updates, base, weights)
    if rank is not None:
        assert {u.rank for u in merged.updates.values()} <= set(range(1, rank + 1))
        return
    dense = reference.merge_factored([_float64(e.updates) for e in experts],
                                     {k: tuple(base[k].shape) for k in merged.updates}, method)
    for key in merged.updates:
        assert rel_err(merged.updates[key].materialize(), 0.8 * dense[key]) < 1e-10, key
    merge_adapter_checkpoints(root / "llama", [root / f"lora{i}" for i in range(3)],
                              tmp_path / "full", method, alpha=0.8, dtype="float64")
    full = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "full")
    with torch.no_grad():
        ours = full(tokens).logits
    assert rel_err(ours, unmerged) <= 2 * rel_err(peft_merged, unmerged) + 1e-6


def test_merged_gpt2_adapter_round_trips_through_peft(zoo, tmp_path):
    root, base = zoo["root"], zoo["gpt2"]
    expert = load_adapter(root / "gpt2_lora", base)
    merged = merge_adapters(base, [expert], "tsv", output="adapter", dtype="float64")  # T = 1
    save_adapter(merged, tmp_path / "merged", like=expert.config, dtype=torch.float32)
    _, weights, _ = _peft_merged(root / "gpt2", transformers.GPT2LMHeadModel, tmp_path / "merged")
    _check_peft_weights(merged.updates, base, weights)
    for key, update in merged.updates.items():
        assert rel_err(update.materialize(), expert.updates[key].materialize(torch.float64)) \
            < 1e-10, key
