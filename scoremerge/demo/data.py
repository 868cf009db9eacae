"""Rotated digits: scikit-learn's bundled 8x8 handwritten digits, one domain per rotation angle,
as in DomainBed's Rotated MNIST (0, 15, 30, 45, 60 and 75 degrees).

Every domain holds all 1,797 digits at its own angle, and one seeded split of the image indices
into train / validation / test is shared by all domains, so no test digit is seen, at any angle,
by any model (the pretrained base, an expert, or the alpha search). Rotation is done in torch,
on a canvas padded from 8x8 to 12x12 so that no rotation cuts off a corner of the digit.
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ANGLES = (0, 15, 30, 45, 60, 75)
CANVAS = 12                       # the 8x8 digit's diagonal (11.3 px) fits at every angle
N_CLASSES = 10
SPLIT_FRACTIONS = (0.6, 0.15, 0.25)          # train, validation, test


@dataclass(frozen=True)
class Split:
    """Images [N, 1, CANVAS, CANVAS] in [0, 1] and labels [N] (int64)."""
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self):
        return len(self.y)

    def to(self, device):
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class Domain:
    angle: int
    train: Split
    val: Split
    test: Split

    def to(self, device):
        return Domain(self.angle, self.train.to(device), self.val.to(device), self.test.to(device))


@functools.lru_cache(maxsize=1)
def load_digits_tensors():
    """The bundled digits as float images [1797, 1, CANVAS, CANVAS] in [0, 1] and labels (read
    once per process; callers index them, which copies, and never write to them)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the demo reads scikit-learn's bundled digits: "
                          "pip install 'scoremerge[demo]' (or scikit-learn)") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0     # pixel values 0..16
    pad = (CANVAS - images.shape[-1]) // 2
    images = F.pad(images, (pad, pad, pad, pad)).unsqueeze(1)
    return images, torch.tensor(digits.target, dtype=torch.int64)


def split_indices(n, seed):
    """A seeded permutation of range(n) cut into train / validation / test index tensors."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = round(SPLIT_FRACTIONS[0] * n)
    n_val = round(SPLIT_FRACTIONS[1] * n)
    return perm[:n_train], perm[n_train:n_train + n_val], perm[n_train + n_val:]


def transform(images, angle_deg=0.0, shift=(0.0, 0.0), scale=1.0):
    """Rotate (counter-clockwise, degrees), scale and shift (pixels) images [N, 1, H, W] about
    their centre with bilinear sampling; angle, shift and scale are scalars or per-image [N]."""
    n, _, h, w = images.shape
    angle = torch.as_tensor(angle_deg, dtype=torch.float32).expand(n) * (math.pi / 180)
    scale = torch.as_tensor(scale, dtype=torch.float32).expand(n)
    shift = torch.as_tensor(shift, dtype=torch.float32).expand(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output coordinates to input ones in [-1, 1]: the inverse transform.
    theta = torch.stack([torch.stack([cos, -sin, -shift[:, 0] * 2 / w], -1),
                         torch.stack([sin, cos, -shift[:, 1] * 2 / h], -1)], 1)
    theta = theta.to(images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotated_domains(seed, angles=ANGLES):
    """One Domain per angle; the same seeded index split for every angle."""
    images, labels = load_digits_tensors()
    parts = split_indices(len(labels), seed)
    domains = []
    for angle in angles:
        rotated = transform(images, angle)
        train, val, test = (Split(rotated[i], labels[i]) for i in parts)
        domains.append(Domain(angle, train, val, test))
    return domains


def upright_train(seed):
    """The base model's pretraining data: the shared train split, upright (never rotated)."""
    images, labels = load_digits_tensors()
    train, _, _ = split_indices(len(labels), seed)
    return Split(images[train], labels[train])


def light_augment(x, generator):
    """The base's augmentation: shifts of up to one pixel and scaling by 0.9-1.1, no rotation,
    so the base never sees a rotated digit."""
    n = x.shape[0]
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1)
    scale = 0.9 + 0.2 * torch.rand(n, generator=generator)
    return transform(x, 0.0, shift, scale)
