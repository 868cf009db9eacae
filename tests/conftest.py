import os

import pytest
import torch

# Without a GPU, Triton kernels run through the interpreter, which reads this variable when a
# kernel is defined: set it before anything imports scoremerge's kernel modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def rel_err(x, y):
    """Relative Frobenius error of x against the answer y (in float64 on the CPU): the one helper
    the tests measure errors with."""
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    return ((x - y).norm() / y.norm().clamp_min(1e-300)).item()


def random_task_vectors(shapes, T, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [{k: (scale * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype)
             for k, s in shapes.items()} for _ in range(T)]


# Tall, wide, square, odd sizes, repeated shapes (batched together), a 1-D key, and a 2-D key
# too thin for three tasks (the mean path for SCORE and TSV-M; Iso-C and Iso-CTS merge it
# isotropically).
MIXED_SHAPES = {"blocks.0.qkv": (45, 15), "blocks.1.qkv": (45, 15), "blocks.0.proj": (15, 15),
                "blocks.0.fc1": (29, 15), "blocks.0.fc2": (15, 29), "wide": (7, 33),
                "blocks.0.norm": (15,), "pos_embed": (2, 15), "head": (10, 15)}


@pytest.fixture
def mixed_task_vectors():
    return random_task_vectors(MIXED_SHAPES, T=3, seed=1)
