"""Sublayer capture: the project's one path from a forward pass to pooled features.

Hooks are put on canonical sublayers (per block ``i``: ``blocks.{i}.attn``,
``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.act``, ``blocks.{i}.mlp.fc2``, ``blocks.{i}``),
each output is normalised to (batch, tokens, width), pooled on the model's device, and handed
back per forward pass as ``{name: (rows, features)}`` in the caller's order.

A model says where each canonical name lives with ``model.canonical_sublayers()``
(``{canonical name: module path}``); a model without that method is read as timm-named
(``blocks.{i}.attn``, ``blocks.{i}.mlp.fc1`` ...), so a timm ViT works as it is.

Token pooling (``pooling=``), for a sublayer output (B, T, D) with P prefix tokens
(class / register tokens) and T_p = T - P patch tokens:

* ``"mean"``: mean over the patch tokens -> (B, D). The default.
* ``"cls"``: the class token (token 0) -> (B, D); refused for a model without one.
* ``"flatten"``: all T tokens, prefix included, concatenated -> (B, T·D).
* ``"tokens"``: each patch token an example -> (B·T_p, D), sample-major: row ``b·T_p + t``
  is token ``t`` of sample ``b``.

Features come back detached, float32, contiguous, on the model's device (the CKA engine runs
there; nothing here synchronises with the device or checks for NaN/Inf — the engine does).

Example:
    >>> import torch
    >>> from cka_geo.models.vit import ViTConfig, VisionTransformer
    >>> from cka_geo.features import capture, resolve_sublayers
    >>> model = VisionTransformer(ViTConfig(img_size=16, patch_size=4, in_chans=13,
    ...                                     embed_dim=32, depth=2, num_heads=2)).eval()
    >>> names = resolve_sublayers(model, kinds=("fc1", "block"))
    >>> names
    ['blocks.0.mlp.fc1', 'blocks.0', 'blocks.1.mlp.fc1', 'blocks.1']
    >>> with capture(model, names) as cap:
    ...     _ = model(torch.randn(4, 13, 16, 16))
    ...     feats = cap.pop()
    >>> {k: tuple(v.shape) for k, v in feats.items()}
    {'blocks.0.mlp.fc1': (4, 128), 'blocks.0': (4, 32), 'blocks.1.mlp.fc1': (4, 128), 'blocks.1': (4, 32)}
"""


from cka_geo.features.hooks import Capture, CapturedBatch, capture, forward_batch
from cka_geo.features.pool import pool_tokens
from cka_geo.features.select import resolve_sublayers, sublayer_map
from cka_geo.sublayers import DEFAULT_KINDS, KINDS, POOLINGS, TIME_MODES

__all__ = [
    "DEFAULT_KINDS",
    "KINDS",
    "POOLINGS",
    "TIME_MODES",
    "Capture",
    "CapturedBatch",
    "capture",
    "forward_batch",
    "pool_tokens",
    "resolve_sublayers",
    "sublayer_map",
]
