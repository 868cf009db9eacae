"""A small vision transformer for 12x12 digits: patch embedding, pre-norm transformer blocks with
multi-head self-attention and an MLP, a class token and a linear head. Parameter names follow
timm's ViT (blocks.0.attn.qkv.weight, blocks.0.mlp.fc1.weight, norm, head), so the merge methods
see the same kinds of keys as on a real ViT: 2-D attention and MLP matrices, biases, norms,
position embeddings and a class token."""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    image: int = 12
    patch: int = 3
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp: int = 128
    classes: int = 10

    def as_dict(self):
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """images [B, 1, image, image] -> logits [B, classes]."""

    def __init__(self, config=ViTConfig()):
        super().__init__()
        if config.image % config.patch or config.dim % config.heads:
            raise ValueError(f"image must be a multiple of patch and dim of heads: {config}")
        self.config = config
        n_patches = (config.image // config.patch) ** 2
        self.patch_embed = nn.Linear(config.patch ** 2, config.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, config.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(config.dim, config.heads, config.mlp)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.classes)

    def forward(self, images):
        p = self.config.patch
        patches = F.unfold(images, kernel_size=p, stride=p).transpose(1, 2)   # [B, n, p*p]
        x = self.patch_embed(patches)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))
