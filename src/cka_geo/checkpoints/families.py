"""Model families cka-geo can build, and the ones it recognises but refuses."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cka_geo.errors import CheckpointError
from cka_geo.models.croma import CromaConfig, CromaEncoder
from cka_geo.models.dofa import DofaConfig, DofaVisionTransformer
from cka_geo.models.openclip import OpenClipVisionConfig, OpenClipVisionTransformer
from cka_geo.models.vit import VisionTransformer, ViTConfig

#: family -> (config class, model class)
FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "timm": (ViTConfig, VisionTransformer),
    "open_clip": (OpenClipVisionConfig, OpenClipVisionTransformer),
    "dofa": (DofaConfig, DofaVisionTransformer),
    "croma": (CromaConfig, CromaEncoder),
}
#: Families built on the timm-named ViT (a ``head`` is kept apart, ``num_classes`` applies).
TIMM_LIKE = ("timm", "dofa")

#: Recognised families that cannot be built, with the reason.
UNSUPPORTED: dict[str, str] = {
    "galileo": (
        "Galileo checkpoint detected (blocks.{i}.attn.q/.k/.v): its multi-modal token "
        "embeddings and separate q/k/v projections are not supported"
    ),
}


def family_of_config(config: Any) -> str:
    """The family whose config class ``config`` is (the exact class first: DOFA's extends timm's)."""
    for name, (cfg_cls, _) in FAMILIES.items():
        if type(config) is cfg_cls:
            return name
    for name, (cfg_cls, _) in FAMILIES.items():
        if isinstance(config, cfg_cls):
            return name
    raise CheckpointError(f"unknown config type {type(config).__name__}")


def instantiate(family: str, config: Any, device: str | torch.device = "cpu") -> nn.Module:
    """An (uninitialised on 'meta') model of ``family`` for ``config``."""
    if family not in FAMILIES:
        raise CheckpointError(UNSUPPORTED.get(family, f"unknown model family {family!r}"))
    with torch.device(device):
        return FAMILIES[family][1](config)


def check_keys(family: str, config: Any, sd: dict[str, torch.Tensor]) -> None:
    """Refuse a state dict that would not load strictly, naming the first bad key."""
    expected = {
        k: tuple(v.shape) for k, v in instantiate(family, config, "meta").state_dict().items()
    }
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise CheckpointError(
            f"encoder lacks {len(missing)} key(s) the inferred model needs, first {missing[0]!r}"
        )
    if unexpected:
        first = unexpected[0] if len(unexpected[0]) <= 80 else unexpected[0][:79] + "…"
        raise CheckpointError(
            f"encoder has {len(unexpected)} key(s) the inferred model does not know, first {first!r}"
        )
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise CheckpointError(
                f"{k!r} has shape {tuple(sd[k].shape)} but the inferred model needs {shape}"
            )
