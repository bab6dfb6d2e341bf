"""The models cka-geo builds from checkpoints: one timm-named ViT, and open_clip's towers.

* :mod:`~cka_geo.models.vit`: :class:`ViTConfig` and :class:`VisionTransformer`, whose
  module names are timm's (they double as checkpoint keys and canonical sublayer names).
* :mod:`~cka_geo.models.openclip`: open_clip visual towers (RemoteCLIP, MS-CLIP).
"""

from cka_geo.models.vit import VisionTransformer, ViTConfig

__all__ = ["ViTConfig", "VisionTransformer"]
