"""cka-geo: where did fine-tuning change my vision transformer?

Sublayer-by-sublayer centered kernel alignment (CKA) between two checkpoints of one ViT.
Importing this package pulls in torch and numpy only: plotting and training frameworks are
imported where they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it; resolved on first access so `import cka_geo` stays light.
_LAZY = {
    "ViTConfig": "cka_geo.vit",
    "VisionTransformer": "cka_geo.vit",
    "CkaGeoError": "cka_geo.errors",
    "UsageError": "cka_geo.errors",
    "CheckpointError": "cka_geo.errors",
    "DataError": "cka_geo.errors",
    "FeatureError": "cka_geo.errors",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cka_geo' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
