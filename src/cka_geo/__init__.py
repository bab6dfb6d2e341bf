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
    # functional core and accumulator
    "cka": "cka_geo.functional",
    "hsic": "cka_geo.functional",
    "gram": "cka_geo.functional",
    "gram_linear": "cka_geo.functional",
    "gram_rbf": "cka_geo.functional",
    "linear_cka_feature_space": "cka_geo.functional",
    "MinibatchCKA": "cka_geo.accumulator",
    "CKAResult": "cka_geo.accumulator",
    "cka_matrix": "cka_geo.accumulator",
    # models, checkpoints, capture, the main job
    "capture": "cka_geo.features",
    "forward_batch": "cka_geo.features",
    "resolve_sublayers": "cka_geo.features",
    "load_checkpoint": "cka_geo.checkpoints",
    "build_model": "cka_geo.checkpoints",
    "save_checkpoint": "cka_geo.checkpoints",
    "check_pair": "cka_geo.checkpoints",
    "compare_checkpoints": "cka_geo.compare",
    "compare_many": "cka_geo.compare",
    "compare_cross": "cka_geo.compare",
    "CompareOptions": "cka_geo.compare",
    "ViTConfig": "cka_geo.models.vit",
    "VisionTransformer": "cka_geo.models.vit",
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
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once; later lookups never reach here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
