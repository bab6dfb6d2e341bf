"""The model pair the benchmarks time: a random ViT and a copy of it with noise added."""

from __future__ import annotations

import torch

from cka_geo.vit import VisionTransformer, ViTConfig


def model_pair(
    cfg: ViTConfig, device: torch.device, change: float = 0.01, relative: bool = False
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(pre, ft): ft = pre + change * N(0, 1) per parameter (times the tensor's std if relative)."""
    torch.manual_seed(0)
    pre = VisionTransformer(cfg).to(device).eval()
    ft = VisionTransformer(cfg).to(device).eval()
    ft.load_state_dict(pre.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            scale = change * (p.std().nan_to_num() if relative else 1.0)
            p.add_(scale * torch.randn_like(p))
    return pre, ft
