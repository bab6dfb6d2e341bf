"""check_pair: refuses different architectures, detects identical encoders, measures change."""

from __future__ import annotations

import math

import pytest
import torch

from cka_geo.checkpoints import check_pair, load_checkpoint, save_checkpoint
from cka_geo.errors import ArchitectureMismatchError
from cka_geo.openclip import OpenClipVisionConfig, OpenClipVisionTransformer
from cka_geo.vit import VisionTransformer, ViTConfig

CFG = ViTConfig(img_size=16, patch_size=8, in_chans=13, embed_dim=32, depth=2, num_heads=1)


def _save(tmp_path, name, model, cfg=CFG, **kw):
    path = tmp_path / name
    torch.save(
        {"state_dict": {f"model.encoder.{k}": v for k, v in model.state_dict().items()}, **kw}, path
    )
    return load_checkpoint(path)


def test_frozen_backbone_fine_tune_is_identical(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(CFG)
    pre = load_checkpoint(save_checkpoint(tmp_path / "pre.safetensors", model, CFG))
    # the fine-tune adds a decoder and a head, but the encoder is frozen
    sd = {f"model.encoder.{k}": v.clone() for k, v in model.state_dict().items()}
    sd["model.decoder.0.weight"] = torch.randn(4, 32)
    torch.save({"state_dict": sd}, tmp_path / "ft.ckpt")
    ft = load_checkpoint(tmp_path / "ft.ckpt")
    report = check_pair(pre, ft)
    assert report.identical and report.changed == [] and report.max_abs_diff == 0.0
    assert all(v == 0.0 for v in report.sublayer_change.values())
    assert "identical" in report.summary() and "CKA will be 1" in report.summary()


def test_changes_are_measured_per_tensor_and_sublayer(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(CFG)
    pre = _save(tmp_path, "pre.ckpt", model)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight.mul_(1.5)  # relative change exactly 0.5
        model.blocks[0].attn.proj.bias.add_(0.25)
    ft = _save(tmp_path, "ft.ckpt", model)
    report = check_pair(pre, ft)
    assert not report.identical
    assert report.changed == ["blocks.0.attn.proj.bias", "blocks.1.mlp.fc1.weight"]
    assert report.tensor_change["blocks.1.mlp.fc1.weight"] == pytest.approx(0.5)
    assert report.tensor_change["blocks.0.attn.proj.bias"] == math.inf  # from zeros
    w, b = pre.state_dict["blocks.1.mlp.fc1.weight"], pre.state_dict["blocks.1.mlp.fc1.bias"]
    want = 0.5 * w.double().norm() / torch.sqrt(w.double().norm() ** 2 + b.double().norm() ** 2)
    assert report.sublayer_change["blocks.1.mlp.fc1"] == pytest.approx(float(want))
    assert report.sublayer_change["blocks.1.mlp.fc2"] == 0.0
    assert "blocks.1.mlp.act" not in report.sublayer_change
    assert 0 < report.sublayer_change["blocks.1"] < report.sublayer_change["blocks.1.mlp.fc1"]
    assert report.max_abs_diff == pytest.approx(max(0.25, float(0.5 * w.abs().max())))


def test_width_mismatch_names_first_key_and_shapes(tmp_path):
    a = _save(tmp_path, "a.ckpt", VisionTransformer(CFG))
    b = _save(
        tmp_path, "b.ckpt", VisionTransformer(ViTConfig(**{**CFG.to_dict(), "mlp_hidden_dim": 64}))
    )
    with pytest.raises(ArchitectureMismatchError) as info:
        check_pair(a, b)
    msg = str(info.value)
    assert "'blocks.0.mlp.fc1.weight'" in msg and "(128, 32)" in msg and "(64, 32)" in msg
    assert "a.ckpt" in msg and "b.ckpt" in msg and "\n" not in msg


def test_depth_mismatch_names_missing_keys(tmp_path):
    a = _save(tmp_path, "a.ckpt", VisionTransformer(CFG))
    b = _save(tmp_path, "b.ckpt", VisionTransformer(ViTConfig(**{**CFG.to_dict(), "depth": 1})))
    with pytest.raises(
        ArchitectureMismatchError,
        match=r"'blocks\.1\.norm1\.weight' \(32,\) is in .*a\.ckpt but missing from .*b\.ckpt",
    ):
        check_pair(a, b)
    with pytest.raises(
        ArchitectureMismatchError, match=r"is in .*a\.ckpt but missing from .*b\.ckpt"
    ):
        check_pair(b, a)


def test_heads_and_family_mismatch(tmp_path):
    model = VisionTransformer(CFG)
    a = load_checkpoint(save_checkpoint(tmp_path / "a.pt", model, CFG))
    cfg2 = ViTConfig(**{**CFG.to_dict(), "num_heads": 2})
    b = load_checkpoint(save_checkpoint(tmp_path / "b.pt", model.state_dict(), cfg2))
    with pytest.raises(ArchitectureMismatchError, match=r"num_heads is 1 .* and 2"):
        check_pair(a, b)
    ocfg = OpenClipVisionConfig(
        image_size=16, patch_size=8, in_chans=13, width=32, layers=2, heads=1, mlp_hidden_dim=64
    )
    c = load_checkpoint(save_checkpoint(tmp_path / "c.pt", OpenClipVisionTransformer(ocfg), ocfg))
    # an open_clip tower is converted into the timm-named ViT: refused by its keys, not its family
    with pytest.raises(ArchitectureMismatchError, match=r"norm_pre|embed_dim|pos_embed|shape|missing"):
        check_pair(a, c)


def test_open_clip_sublayer_change_uses_its_paths(tmp_path):
    cfg = OpenClipVisionConfig(
        image_size=16, patch_size=8, in_chans=3, width=32, layers=2, heads=1, mlp_hidden_dim=64
    )
    torch.manual_seed(0)
    model = OpenClipVisionTransformer(cfg)
    a = load_checkpoint(save_checkpoint(tmp_path / "a.pt", model, cfg))
    with torch.no_grad():
        model.transformer.resblocks[0].mlp.c_fc.weight.mul_(2.0)
    b = load_checkpoint(save_checkpoint(tmp_path / "b.pt", model, cfg))
    report = check_pair(a, b)
    assert report.changed == ["blocks.0.mlp.fc1.weight"]  # converted to timm names on load
    assert report.sublayer_change["blocks.0.mlp.fc1"] > 0
    assert report.sublayer_change["blocks.0.attn"] == 0.0
    assert "blocks.0.mlp.fc1" in report.summary()


def test_plain_state_dicts():
    sd = VisionTransformer(CFG).state_dict()
    assert check_pair(sd, {k: v.clone() for k, v in sd.items()}).identical
    with pytest.raises(ArchitectureMismatchError, match="missing"):
        check_pair(sd, {k: v for k, v in sd.items() if k != "pos_embed"})


def test_image_size_mismatch_hint(tmp_path):
    a = _save(tmp_path, "a.ckpt", VisionTransformer(CFG))
    b = _save(tmp_path, "b.ckpt", VisionTransformer(ViTConfig(**{**CFG.to_dict(), "img_size": 32})))
    with pytest.raises(
        ArchitectureMismatchError,
        match=r"'pos_embed' has shape \(1, 5, 32\) .* \(1, 17, 32\) .*image sizes",
    ):
        check_pair(a, b)


def test_final_norm_swap_is_tolerated_and_said(tmp_path):
    """MAE pretraining keeps `norm`; its global-pool fine-tune has `fc_norm` instead."""
    torch.manual_seed(0)
    pre_model = VisionTransformer(CFG)
    ft_model = VisionTransformer(ViTConfig(**{**CFG.to_dict(), "global_pool": "avg"}))
    ft_model.load_state_dict(
        {k: v for k, v in pre_model.state_dict().items() if not k.startswith("norm.")}, strict=False
    )
    pre, ft = _save(tmp_path, "pre.ckpt", pre_model), _save(tmp_path, "ft.ckpt", ft_model)
    assert ft.config.use_fc_norm and not pre.config.use_fc_norm
    report = check_pair(pre, ft)
    assert report.identical  # every shared tensor is equal
    assert "final norms differ (fc_norm, norm" in report.summary()
    assert "norm.weight" not in report.tensor_change
    with pytest.raises(ArchitectureMismatchError, match=r"'blocks\.1\.norm1\.weight'"):
        check_pair(
            pre, {k: v for k, v in ft.state_dict.items() if not k.startswith("blocks.1.norm1.")}
        )
