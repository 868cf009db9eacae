"""Entropy-adaptive online merging: entropy weights against the reference, OnlineMerger's
coefficients (sum to one, favour the confident expert, momentum, coupling), exactness when one
coefficient is one, BatchNorm modes, head selection, and bad input that leaves the model as it
was. The strategies are in tests/test_online_strategies.py."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from scoremerge import MergeInputError, OnlineMerger, ops, ref
from scoremerge.demo.model import TinyViT
from scoremerge.online import merger as merger_module

from online_models import SMALL_VIT, assert_same_state, bn_model, images, snapshot, vit_experts


# ---- ops.entropy_weights ------------------------------------------------------------------

@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("K, B, C, temperature", [(1, 1, 2, 1.0), (3, 17, 10, 0.1),
                                                   (5, 9, 1001, 0.05), (4, 33, 7, 3.0)])
def test_entropy_weights_match_the_reference(per_sample, K, B, C, temperature):
    g = torch.Generator().manual_seed(K * B + C)
    logits = torch.randn(K, B, C, generator=g) * torch.rand(K, 1, 1, generator=g) * 6
    w_ref, h_ref = ref.entropy.entropy_weights(logits, temperature, per_sample)
    w, h = ops.entropy_weights(logits, temperature, per_sample=per_sample)
    w64, h64 = ops.entropy_weights(logits.double(), temperature, per_sample=per_sample)
    assert w.dtype == h.dtype == torch.float32 and w64.dtype == torch.float64
    torch.testing.assert_close(w64, w_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h64, h_ref, rtol=1e-12, atol=1e-14)
    # fp32: entropies of magnitude <= ln C, each exp/log ~ 1 ulp, divided by the temperature
    torch.testing.assert_close(w.double(), w_ref, rtol=0, atol=1e-5 / temperature)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-6)
    assert abs(w64.sum().item() - 1) < 1e-12


def test_entropy_weights_favour_the_confident_expert_and_temperature_sharpens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, 10, generator=g)
    logits[1] *= 8                                          # expert 1: low entropy
    warm, H = ops.entropy_weights(logits, 1.0)
    cold, _ = ops.entropy_weights(logits, 0.05)
    assert H.argmin() == 1 and warm.argmax() == 1 and cold[1] > warm[1] > 1 / 3
    hot, _ = ops.entropy_weights(logits, 1e6)
    torch.testing.assert_close(hot, torch.full((3,), 1 / 3), rtol=0, atol=1e-5)


def test_entropy_weights_name_bad_input():
    z = torch.randn(3, 4, 5)
    z[2, 1, 0] = float("nan")
    with pytest.raises(MergeInputError, match=r"expert\(s\) \[2\]"):
        ops.entropy_weights(z, 0.1)
    for t in (0, -1.0, float("inf"), "0.1"):
        with pytest.raises(MergeInputError, match="temperature"):
            ops.entropy_weights(torch.randn(2, 3, 4), t)
    with pytest.raises(MergeInputError, match=r"\[K, B, C\]"):
        ops.entropy_weights(torch.randn(2, 0, 4), 0.1)


# ---- OnlineMerger --------------------------------------------------------------------------

@pytest.mark.parametrize("expert_passes", ["loop", "vmap"])
@pytest.mark.parametrize("coupled", [False, True])
def test_coefficients_sum_to_one_and_favour_the_confident_expert(expert_passes, coupled):
    experts = vit_experts(4, sharpen=2)
    merger = OnlineMerger(TinyViT(SMALL_VIT), experts, temp_enc=0.5, temp_head=0.5,
                          coupled=coupled, expert_passes=expert_passes)
    result = merger(images(13))
    assert result.logits.shape == (13, SMALL_VIT.classes)
    for group in ("encoder", "head"):
        a = result.coefficients[group]
        assert a.shape == (4,) and abs(a.sum().item() - 1) < 1e-6 and (a >= 0).all()
    assert result.entropies.argmin() == 2 and result.coefficients["encoder"].argmax() == 2
    if coupled:
        assert result.head_entropies is None
        assert torch.equal(result.coefficients["head"], result.coefficients["encoder"])
    else:
        assert result.head_entropies.argmin() == 2 and result.coefficients["head"].argmax() == 2


def test_merged_model_is_the_mix_of_the_experts():
    experts = vit_experts(3)
    model = TinyViT(SMALL_VIT)
    merger = OnlineMerger(model, experts, temp_enc=0.3, temp_head=0.2, groups=1)
    x = images(9, seed=1)
    result = merger(x)
    a_enc, a_head = result.coefficients["encoder"], result.coefficients["head"]
    for key, value in model.state_dict().items():
        a = a_head if key.startswith("head.") else a_enc
        expected = sum(a[k].double() * experts[k][key].double() for k in range(3))
        torch.testing.assert_close(value.double(), expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(result.logits, model(x), rtol=0, atol=0)


def test_the_expert_exactly_when_its_coefficient_is_one():
    experts = vit_experts(3, sharpen=1)
    model = TinyViT(SMALL_VIT)
    # Entropy gaps of about a nat at temperature 1e-3 make the softmax exactly one-hot in fp32.
    merger = OnlineMerger(model, experts, temp_enc=1e-3, temp_head=1e-3)
    x = images(8, seed=2)
    result = merger(x)
    assert result.coefficients["encoder"].tolist() == [0.0, 1.0, 0.0]
    assert result.coefficients["head"].tolist() == [0.0, 1.0, 0.0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, experts[1][key]), key
    # The same parameters in other memory (the arena's views are not 64-byte aligned) may take
    # other CPU GEMM code paths: equal logits up to a few ulps, not bit for bit.
    with torch.no_grad():
        expected = functional_call(TinyViT(SMALL_VIT).eval(), experts[1], (x,))
    torch.testing.assert_close(result.logits, expected, rtol=1e-6, atol=1e-5)
    single_model = TinyViT(SMALL_VIT)
    single = OnlineMerger(single_model, experts[:1])(x)                    # K = 1
    assert single.coefficients["encoder"].tolist() == [1.0]
    for key, value in single_model.state_dict().items():
        assert torch.equal(value, experts[0][key]), key


def test_momentum_smooths_the_coefficients_across_batches():
    experts = vit_experts(3, sharpen=0)
    x1, x2 = images(10, seed=3), images(10, seed=4) * 3
    fresh = OnlineMerger(TinyViT(SMALL_VIT), experts, temp_enc=0.5, groups=1)
    raw1, raw2 = (fresh(x).coefficients["encoder"] for x in (x1, x2))
    smooth = OnlineMerger(TinyViT(SMALL_VIT), experts, temp_enc=0.5, momentum=0.75)
    first = smooth(x1).coefficients
    second = smooth(x2).coefficients
    torch.testing.assert_close(first["encoder"], raw1)        # the first batch is not smoothed
    torch.testing.assert_close(second["encoder"], 0.75 * raw1 + 0.25 * raw2)
    assert abs(second["head"].sum().item() - 1) < 1e-6


def test_loop_and_vmap_passes_agree():
    experts = vit_experts(3, sharpen=1)
    x = images(11, seed=5)
    a = OnlineMerger(TinyViT(SMALL_VIT), experts, temp_enc=0.3, expert_passes="loop")(x)
    b = OnlineMerger(TinyViT(SMALL_VIT), experts, temp_enc=0.3, expert_passes="vmap")(x)
    torch.testing.assert_close(a.entropies, b.entropies, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-5)


def test_groups_of_a_batchnorm_model_hold_two_samples_at_least():
    """Batch statistics need two samples: a BatchNorm model's groups never hold one."""
    experts = [bn_model(s).state_dict() for s in range(3)]
    merger = OnlineMerger(bn_model(9), experts, groups=8, group_prior=0.0)
    x = torch.randn(9, 7, generator=torch.Generator().manual_seed(1)) * 3
    result = merger(x)
    assert result.groups is not None and torch.bincount(result.groups).min() >= 2
    assert torch.isfinite(result.logits).all()


@pytest.mark.parametrize("bn", ["batch", "mix"])
def test_batchnorm_statistics(bn):
    experts = [bn_model(s).state_dict() for s in range(3)]
    model = bn_model(9)
    merger = OnlineMerger(model, experts, bn=bn, temp_enc=1e-4, temp_head=1e-4, groups=1)
    arena_before = merger.arena.buffer.clone()
    x = torch.randn(16, 7, generator=torch.Generator().manual_seed(0)) * 2 + 1
    result = merger(x)
    k = result.coefficients["encoder"].argmax().item()
    assert result.coefficients["encoder"][k] == 1.0 and result.coefficients["head"][k] == 1.0
    reference = bn_model(0)
    reference.load_state_dict(experts[k])
    reference.train(bn == "batch")               # batch statistics, or the running ones
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(result.logits, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(merger.arena.buffer, arena_before)      # running statistics untouched
    assert model[1].running_mean is not None and not model.training


def test_head_selection():
    experts = vit_experts(2)
    default = OnlineMerger(TinyViT(SMALL_VIT), experts)
    assert default.head_keys == {"head.weight", "head.bias"}
    by_prefix = OnlineMerger(TinyViT(SMALL_VIT), experts, head="head")
    by_predicate = OnlineMerger(TinyViT(SMALL_VIT), experts, head=lambda k: k.startswith("head"))
    assert by_prefix.head_keys == by_predicate.head_keys == default.head_keys
    with pytest.raises(MergeInputError, match="selects none"):
        OnlineMerger(TinyViT(SMALL_VIT), experts, head="classifier")
    with pytest.raises(MergeInputError, match="selects every key"):
        OnlineMerger(TinyViT(SMALL_VIT), experts, head=lambda k: True)
    with pytest.raises(MergeInputError, match="one submodule"):
        OnlineMerger(TinyViT(SMALL_VIT), experts, head=lambda k: k in ("head.weight", "norm.bias"))
    with pytest.raises(MergeInputError, match="also holds"):
        OnlineMerger(TinyViT(SMALL_VIT), experts, head="blocks.0.mlp.fc2.weight")


class Scaled(nn.Module):
    """A model whose output is not its head's output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return 2 * self.head(self.body(x))


def test_a_head_that_is_not_the_last_layer_is_refused_before_any_write():
    torch.manual_seed(0)
    experts = [Scaled().state_dict() for _ in range(2)]
    model = Scaled()
    before = snapshot(model)
    merger = OnlineMerger(model, experts)
    with pytest.raises(MergeInputError, match="last layer"):
        merger(torch.randn(4, 5))
    assert_same_state(model, before)


def test_bad_experts_are_refused_and_the_model_left_unchanged():
    model = bn_model(5)
    before = snapshot(model)
    good = [bn_model(s).state_dict() for s in range(2)]
    missing = {k: v for k, v in good[1].items() if k != "3.bias"}
    wrong_shape = {**good[1], "0.weight": torch.randn(6, 8)}
    nan = {**good[1], "3.weight": torch.full((4, 6), float("nan"))}
    cases = [([], "K >= 1"), ([good[0], missing], "keys"), ([good[0], wrong_shape], "shape"),
             ([good[0], nan], "NaN"), ([{k: v for k, v in g.items() if k != "3.bias"}
                                        for g in good], "experts lack")]
    for experts, message in cases:
        with pytest.raises(MergeInputError, match=message):
            OnlineMerger(model, experts)
        assert_same_state(model, before)
        assert all(p._base is None for p in model.parameters())     # not rebound into an arena
    for option in ({"temp_enc": 0}, {"temp_head": -1}, {"momentum": 1.0}, {"bn": "frozen"},
                   {"expert_passes": "batched"}):
        with pytest.raises(MergeInputError):
            OnlineMerger(model, good, **option)


def test_bad_batches_leave_the_parameters_unchanged():
    experts = vit_experts(3, sharpen=0)
    model = TinyViT(SMALL_VIT)
    merger = OnlineMerger(model, experts)
    before = snapshot(model)
    with pytest.raises(MergeInputError, match="empty batch"):
        merger(images(0))
    poisoned = images(5)
    poisoned[3, 0, 2, 2] = float("nan")
    with pytest.raises(MergeInputError, match="NaN or Inf"):
        merger(poisoned)
    with pytest.raises(TypeError, match="torch.Tensor"):
        merger([[0.0]])
    assert_same_state(model, before)
    merger(images(5, seed=7))
    after_one = snapshot(model)
    with pytest.raises(MergeInputError, match="NaN or Inf"):
        merger(poisoned)
    assert_same_state(model, after_one)


@pytest.mark.parametrize("batches_before", [0, 1])
def test_a_failure_after_the_encoder_mix_restores_the_parameters(monkeypatch, batches_before):
    experts = vit_experts(3, sharpen=1)
    model = TinyViT(SMALL_VIT)
    merger = OnlineMerger(model, experts, temp_enc=0.3)
    for i in range(batches_before):
        merger(images(6, seed=10 + i))
    before = snapshot(model)
    calls = []
    real = merger_module.entropy_weights

    def failing_on_the_head(logits, temperature, **kw):
        calls.append(1)
        if len(calls) == 2:                    # the head's call: the encoder is mixed by now
            raise RuntimeError("injected")
        return real(logits, temperature, **kw)

    monkeypatch.setattr(merger_module, "entropy_weights", failing_on_the_head)
    with pytest.raises(RuntimeError, match="injected"):
        merger(images(6, seed=99) * 4)
    assert len(calls) == 2
    assert_same_state(model, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_on_a_gpu_the_merger_agrees_with_the_cpu(backend):
    experts = vit_experts(5, sharpen=3)
    x = images(16, seed=11)
    cpu = OnlineMerger(TinyViT(SMALL_VIT), experts, temp_enc=0.3)(x)
    gpu_experts = [{k: v.cuda() for k, v in e.items()} for e in experts]
    model = TinyViT(SMALL_VIT).cuda()
    gpu = OnlineMerger(model, gpu_experts, temp_enc=0.3, backend=backend)(x.cuda())
    for group in ("encoder", "head"):
        torch.testing.assert_close(gpu.coefficients[group].cpu(), cpu.coefficients[group],
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-3, atol=1e-3)
    assert all(p.is_cuda for p in model.parameters())
