"""Tiny synthetic data and models shared by the tests of cka_geo.train."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from cka_geo.vit import VisionTransformer, ViTConfig


def tiny_vit(depth: int = 2, patch: int = 4, img: int = 16, chans: int = 3, dim: int = 32, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(ViTConfig(img_size=img, patch_size=patch, in_chans=chans, embed_dim=dim, depth=depth, num_heads=2))


def seg_tiles(n: int, seed: int, img: int = 16, chans: int = 3) -> TensorDataset:
    """Tiles whose mask (2 classes, some -1) is where band 0 of a smooth blob field is positive."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, img // 4, img // 4, generator=g)
    field = torch.nn.functional.interpolate(coarse, size=(img, img), mode="bilinear", align_corners=False)
    x = torch.randn(n, chans, img, img, generator=g) * 0.3
    x[:, :1] += field
    y = (field[:, 0] > 0.3).long()
    y[:, 0, 0] = -1  # an ignored pixel per tile
    return TensorDataset(x, y)


def cls_tiles(n: int, seed: int, img: int = 16, chans: int = 3, classes: int = 3) -> TensorDataset:
    """Tiles whose class sets the mean of band (class % chans)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    y = y[torch.randperm(n, generator=g)]
    x = torch.randn(n, chans, img, img, generator=g) * 0.5
    for c in range(classes):
        x[y == c, c % chans] += 1.0
    return TensorDataset(x, y)
