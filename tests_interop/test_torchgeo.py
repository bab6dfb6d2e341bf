"""A torchgeo ClassificationTask checkpoint in Lightning's layout loads and runs as the task's ViT."""

from __future__ import annotations

import torch
from _match import assert_same, canonical_spec
from conftest import need

from cka_geo.checkpoints import load_checkpoint


def test_classification_task_ckpt(tmp_path):
    need("timm")
    trainers = need("torchgeo.trainers")
    task = trainers.ClassificationTask(model="vit_tiny_patch16_224", weights=None, in_channels=13, num_classes=10)
    vit = task.model.eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # what Trainer.save_checkpoint writes: state_dict under "model.", hyper_parameters beside
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.6.6"}, tmp_path / "epoch=3.ckpt")
    loaded = load_checkpoint(tmp_path / "epoch=3.ckpt", num_heads=3)
    assert loaded.prefix == "state_dict.model." and loaded.config.in_chans == 13
    x = torch.randn(2, 13, 224, 224)
    assert_same(loaded, vit, canonical_spec(12), x, lambda: vit.forward_features(x))
