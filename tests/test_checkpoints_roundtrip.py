"""save_checkpoint / load_checkpoint / build_model round trips keep the exact config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cka_geo.checkpoints import build_model, load_checkpoint, save_checkpoint
from cka_geo.errors import UsageError
from cka_geo.openclip import OpenClipVisionConfig, OpenClipVisionTransformer
from cka_geo.vit import VisionTransformer, ViTConfig

VIT_CONFIGS = [
    ViTConfig(img_size=32, patch_size=8, in_chans=13, embed_dim=64, depth=2, num_heads=2),
    ViTConfig(
        img_size=24,
        patch_size=4,
        in_chans=6,
        embed_dim=48,
        depth=3,
        num_heads=3,
        class_token=False,
        layer_scale=0.1,
        qkv_bias=False,
        mlp_hidden_dim=80,
        norm_eps=1e-5,
        extra={"note": "x"},
    ),
]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth"])
@pytest.mark.parametrize("cfg", VIT_CONFIGS)
def test_vit_round_trip_exact_config(tmp_path, suffix, cfg):
    torch.manual_seed(0)
    model = VisionTransformer(cfg).eval()
    path = save_checkpoint(tmp_path / f"m{suffix}", model, cfg, extra={"epoch": 7})
    loaded = load_checkpoint(path)
    assert loaded.config == cfg
    assert loaded.family == "timm"
    assert loaded.extra == {"epoch": 7}
    assert len(loaded.sha256) == 64
    rebuilt = build_model(loaded)
    assert not rebuilt.training
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    # no leftover temporary files
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"m{suffix}"]


def test_pt_file_is_weights_only_plain_dict(tmp_path):
    cfg = VIT_CONFIGS[0]
    save_checkpoint(
        tmp_path / "m.pt", VisionTransformer(cfg), cfg, extra={"metrics": {"miou": 0.5}}
    )
    obj = torch.load(tmp_path / "m.pt", weights_only=True)
    assert obj["config"] == cfg.to_dict()
    assert obj["cka_geo"]["format"] == 1
    assert obj["metrics"] == {"miou": 0.5}


def test_head_kept_apart_and_buildable(tmp_path):
    cfg = dataclasses.replace(VIT_CONFIGS[0], num_classes=5)
    model = VisionTransformer(cfg).eval()
    save_checkpoint(tmp_path / "c.safetensors", model, cfg)
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    assert loaded.config == cfg
    assert not any(k.startswith("head.") for k in loaded.state_dict)
    assert set(loaded.head) == {"head.weight", "head.bias"}
    x = torch.randn(2, 13, 32, 32)
    with torch.no_grad():
        assert torch.equal(build_model(loaded, head=True)(x), model(x))
        assert build_model(loaded)(x).shape == (2, 64)


def test_open_clip_round_trip(tmp_path):
    cfg = OpenClipVisionConfig(
        image_size=32,
        patch_size=8,
        in_chans=6,
        width=64,
        layers=2,
        heads=2,
        mlp_hidden_dim=128,
        output_dim=16,
    )
    model = OpenClipVisionTransformer(cfg).eval()
    for suffix in (".pt", ".safetensors"):
        loaded = load_checkpoint(save_checkpoint(tmp_path / f"o{suffix}", model, cfg))
        # files of the former open_clip model class load as the timm-named ViT, exactly
        assert loaded.family == "timm" and loaded.source == "cka_geo"
        c = loaded.config
        assert (c.embed_dim, c.depth, c.num_heads, c.hidden_dim, c.pre_norm, c.norm_eps) == (64, 2, 2, 128, True, 1e-5)
        x = torch.randn(2, 6, 32, 32)
        with torch.no_grad():
            vit = build_model(loaded)
            pooled = vit.forward_head(vit.forward_features(x), pre_logits=True)
            torch.testing.assert_close(pooled @ model.proj, model(x), rtol=1e-5, atol=1e-6)


def test_save_refuses_bad_extra_and_suffix(tmp_path):
    cfg = VIT_CONFIGS[0]
    model = VisionTransformer(cfg)
    with pytest.raises(UsageError, match="extra"):
        save_checkpoint(tmp_path / "a.pt", model, cfg, extra={"obj": object()})
    with pytest.raises(UsageError, match="reserved"):
        save_checkpoint(tmp_path / "a.pt", model, cfg, extra={"config": 1})
    with pytest.raises(UsageError, match="suffix"):
        save_checkpoint(tmp_path / "a.ckpt", model, cfg)
    assert list(tmp_path.iterdir()) == []


def test_num_heads_override_on_project_files(tmp_path):
    cfg = VIT_CONFIGS[0]
    loaded = load_checkpoint(
        save_checkpoint(tmp_path / "v.pt", VisionTransformer(cfg), cfg), num_heads=4
    )
    assert loaded.config.num_heads == 4
    assert any("file says 2" in n for n in loaded.notes)
    ocfg = OpenClipVisionConfig(
        image_size=16, patch_size=8, in_chans=3, width=64, layers=1, heads=1, mlp_hidden_dim=64
    )
    path = save_checkpoint(tmp_path / "o.safetensors", OpenClipVisionTransformer(ocfg), ocfg)
    assert load_checkpoint(path, num_heads=2).config.num_heads == 2
