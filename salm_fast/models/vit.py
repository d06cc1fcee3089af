"""A small Vision Transformer (Dosovitskiy et al. 2021) sized for CPU training.

Patch size follows the image: 4 px up to 32 px (28 px -> 7x7 = 49 tokens), 8 px up to 64 px,
16 px above (224 px -> 14x14). Width 192, depth 6, 3 heads, MLP x2, pre-norm blocks, a class
token and learned position embeddings; no dropout (deterministic given the seed). The input
must be image_size x image_size (the position embedding is sized for it); a size that is not
a multiple of the patch loses its last partial row/column of patches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def patch_size_for(image_size: int) -> int:
    return 4 if image_size <= 32 else 8 if image_size <= 64 else 16


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int, patch: int | None = None,
                 dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: int = 2):
        super().__init__()
        self.image_size = image_size
        self.patch = patch or patch_size_for(image_size)
        grid = image_size // self.patch
        if grid < 1:
            raise ValueError(f"vit: image_size {image_size} is smaller than the patch ({self.patch} px)")
        self.embed = nn.Conv2d(in_channels, dim, self.patch, stride=self.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"vit was built for {self.image_size} px inputs, got {tuple(x.shape[-2:])}")
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # N x T x D
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit(in_channels: int, num_classes: int, image_size: int = 28) -> ViT:
    return ViT(in_channels, num_classes, image_size)


__all__ = ["ViT", "patch_size_for", "vit"]
