"""Small models, batches and state checks shared by the online-merging tests
(tests/test_online.py, tests/test_online_strategies.py)."""
import torch
from torch import nn

from scoremerge.demo.model import TinyViT, ViTConfig

SMALL_VIT = ViTConfig(image=6, patch=3, dim=8, depth=1, heads=2, mlp=12, classes=5)


def vit_experts(K, seed=0, sharpen=None):
    """K TinyViT state dicts; expert `sharpen` gets a 20x head (a far more confident expert)."""
    out = []
    for k in range(K):
        torch.manual_seed(seed * 100 + k)
        sd = {key: v.clone() for key, v in TinyViT(SMALL_VIT).state_dict().items()}
        if k == sharpen:
            sd["head.weight"] *= 20
        out.append(sd)
    return out


def bn_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def images(n, seed=0):
    return torch.rand(n, 1, SMALL_VIT.image, SMALL_VIT.image,
                      generator=torch.Generator().manual_seed(seed))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
