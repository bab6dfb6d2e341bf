"""Fine-tuning from real libraries' checkpoints on a user's folder dataset, from the CLI.

A timm ViT (RGB, saved by safetensors) fine-tunes on a EuroSAT-style folder of 13-band
tiles: the patch embedding is adapted by band name, so before training the adapted encoder
on the 13 bands equals timm's own model on B4 B3 B2. A Hugging Face ViT folder
(``save_pretrained``) fine-tunes too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import need

from cka_geo.checkpoints import build_model, load_checkpoint
from cka_geo.cli import main


def _eurosat(root: Path, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for k, c in enumerate(("AnnualCrop", "Forest", "SeaLake")):
        (root / c).mkdir(parents=True)
        for i in range(6):
            x = rng.integers(0, 3000, (13, size, size)).astype(np.uint16)  # raw DN, as EuroSAT MS
            x[(3, 2, 1)[k]] += 2000
            np.save(root / c / f"{c}_{i + 1}.npy", x)
    return root


def test_timm_rgb_vit_on_13_band_class_folders(tmp_path, capsys):
    need("timm")
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "vit_rgb.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    data, out = _eurosat(tmp_path / "EuroSAT_MS"), tmp_path / "run"
    assert main(["finetune", str(path), "--data", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "4",
                 "--layer-decay", "0.65", "--drop-path", "0.1", "--accum-steps", "2", "--precision", "bf16-mixed",
                 "--threads", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "patch embedding adapted (names: B2 B3 B4 copied" in err and "normalize s2-div10000" in err
    pre = load_checkpoint(out / "pre.pt")
    enc = build_model(pre)
    x = torch.from_numpy(np.load(next((data / "Forest").iterdir())).astype(np.float32))[None] / 10000
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(x), vit.forward_features(x[:, [3, 2, 1]]), rtol=1e-5, atol=1e-5)
    res = json.loads((out / "eval.json").read_text())
    assert 0 <= res["metrics"]["test"]["accuracy"] <= 1
    assert main(["evaluate", str(out), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == res["metrics"]["test"]["accuracy"]


def test_hugging_face_vit_folder_as_the_start(tmp_path, capsys):
    transformers = need("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=128)
    torch.manual_seed(0)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "hf_vit")
    data, out = _eurosat(tmp_path / "EuroSAT_MS"), tmp_path / "run"
    assert main(["finetune", str(tmp_path / "hf_vit"), "--data", str(data), "--out", str(out), "--epochs", "1",
                 "--batch-size", "6", "--bands", "B04", "B03", "B02", "--threads", "2", "--no-progress"]) == 0
    assert "normalize imagenet" in capsys.readouterr().err
    assert load_checkpoint(out / "ft.pt").config.in_chans == 3


def test_timm_vit_at_224_fine_tunes_on_the_embedded_tiles_at_48_px_and_evaluates_there(tmp_path, capsys):
    """A timm ViT-S-shaped model saved by safetensors at its native 224 px, trained at 48 px."""
    need("timm")
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=2).eval()
    path = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    out = tmp_path / "run"
    assert main(["finetune", str(path), "--out", str(out), "--image-size", "48", "--task", "classification",
                 "--epochs", "1", "--stride", "48", "--threads", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "pos_embed resampled from a 14x14 to a 3x3 patch grid" in err
    assert main(["evaluate", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "eval.json").read_text())["metrics"]["test"]
    assert metrics["task"] == "classification" and metrics["accuracy"] == saved["accuracy"]
    assert metrics["loss"] == pytest.approx(saved["loss"], rel=1e-6)  # float32 sums over other batches
