"""compare_models on two library models (no files), with the canonical names of the CLI."""

from __future__ import annotations

import copy

import torch
from conftest import need

from cka_geo.compare import compare_models


def test_compare_two_timm_models():
    need("timm")
    from timm.models.vision_transformer import VisionTransformer

    a = VisionTransformer(img_size=32, patch_size=8, in_chans=13, embed_dim=48, depth=2, num_heads=3).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.blocks[1].mlp.fc1.weight.add_(torch.randn_like(b.blocks[1].mlp.fc1.weight))  # CKA ignores a mere rescaling
    res = compare_models(a, b, samples=8, batch_size=8)
    assert res["layers"][:2] == ["blocks.0.attn", "blocks.0.mlp.fc1"]
    assert res["diagonal"]["blocks.0.mlp.fc1"] > 0.999999 and res["diagonal"]["blocks.1.mlp.fc1"] < 1
    assert res["summary"]["first_changed"] == "blocks.1.mlp.fc1"
    assert all(c["assumed"] == [] for c in (res["checkpoints"].values() if isinstance(res["checkpoints"], dict) else res["checkpoints"]))


def test_compare_two_hf_models():
    tf = need("transformers")
    cfg = tf.Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2,
                          image_size=32, patch_size=8, num_channels=13)
    a = tf.Dinov2Model(cfg).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.encoder.layer[0].mlp.fc2.weight.add_(torch.randn_like(b.encoder.layer[0].mlp.fc2.weight))
    res = compare_models(a, b, samples=8, batch_size=8)
    assert res["summary"]["first_changed"] == "blocks.0.mlp.fc2"
