"""Training for the demo: a base pretrained on upright digits, then one expert per domain
fine-tuned from it. Seeded end to end (initialisation, shuffling, augmentation), so a seed gives
the same weights run after run on one machine."""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .data import light_augment
from .model import TinyViT


@dataclass(frozen=True)
class Schedule:
    epochs: int
    lr: float
    batch: int = 64
    weight_decay: float = 0.0
    warmup_steps: int = 0

    def as_dict(self):
        return asdict(self)


def fit(model, split, schedule, generator, augment=False):
    """AdamW with a linear warm-up and cosine decay over `schedule`; returns the final loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    steps_per_epoch = math.ceil(len(split) / schedule.batch)
    total = schedule.epochs * steps_per_epoch
    warm = schedule.warmup_steps

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(schedule.epochs):
        order = torch.randperm(len(split), generator=generator).to(split.x.device)
        for start in range(0, len(split), schedule.batch):
            idx = order[start:start + schedule.batch]
            x, y = split.x[idx], split.y[idx]
            if augment:
                x = light_augment(x, generator)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return loss.item()


def pretrain(config, split, schedule, seed):
    """The base: a fresh TinyViT trained on `split` (upright digits) with light augmentation.
    Trains on split's device; returns a CPU state dict."""
    with torch.random.fork_rng(devices=[]):          # seed the initialisation, not the caller
        torch.manual_seed(seed)
        model = TinyViT(config).to(split.x.device)
    fit(model, split, schedule, torch.Generator().manual_seed(seed), augment=True)
    return _cpu_state(model)


def finetune(config, base_state, split, schedule, seed):
    """An expert: the base fine-tuned (every parameter) on one domain's train split."""
    model = TinyViT(config)
    model.load_state_dict(base_state)
    model.to(split.x.device)
    fit(model, split, schedule, torch.Generator().manual_seed(seed))
    return _cpu_state(model)


def _cpu_state(model):
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
