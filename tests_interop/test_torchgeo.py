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


def test_a_checkpoint_written_by_a_real_lightning_trainer(tmp_path):
    # One optimizer step of torchgeo's ClassificationTask under lightning's Trainer, then the
    # Trainer's own save_checkpoint: the file users have after fine-tuning with torchgeo.
    need("timm")
    trainers = need("torchgeo.trainers")
    pl = need("lightning.pytorch")
    torch.manual_seed(0)
    task = trainers.ClassificationTask(model="vit_tiny_patch16_224", weights=None, in_channels=13, num_classes=4)
    _one_step_and_save(pl, task, bands=13, classes=4, path=tmp_path / "last.ckpt")
    loaded = load_checkpoint(tmp_path / "last.ckpt", num_heads=3)
    assert loaded.prefix == "state_dict.model." and loaded.config.in_chans == 13
    vit = task.model.eval()
    x = torch.randn(2, 13, 224, 224)
    assert_same(loaded, vit, canonical_spec(12), x, lambda: vit.forward_features(x))


def test_a_terratorch_checkpoint_written_by_a_real_lightning_trainer(tmp_path):
    # TerraTorch's ClassificationTask with its Prithvi-EO backbone (random weights), one
    # optimizer step, the Trainer's own checkpoint; the LayerNorm eps (1e-5) and the heads
    # come from cka-geo's table of known families, not from the weights.
    need("timm")
    tasks = need("terratorch.tasks")
    pl = need("lightning.pytorch")
    torch.manual_seed(0)
    bands = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
    task = tasks.ClassificationTask(
        model_factory="EncoderDecoderFactory", loss="ce",
        model_args={"backbone": "prithvi_eo_tiny", "backbone_pretrained": False, "backbone_bands": bands,
                    "decoder": "IdentityDecoder", "num_classes": 3},
    )
    _one_step_and_save(pl, task, bands=6, classes=3, path=tmp_path / "last.ckpt")
    loaded = load_checkpoint(tmp_path / "last.ckpt")
    assert loaded.prefix == "state_dict.model.encoder." and loaded.config.in_chans == 6
    enc = task.model.encoder.eval()
    x = torch.randn(2, 6, 224, 224)
    assert_same(loaded, enc, canonical_spec(loaded.config.depth), x, lambda: enc(x))


def _one_step_and_save(pl, task, *, bands: int, classes: int, path) -> None:
    """One optimizer step of ``task`` under lightning's Trainer, then its own save_checkpoint."""
    data = [{"image": torch.randn(bands, 224, 224), "label": torch.tensor(i % classes)} for i in range(4)]
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=path.parent)
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(path)
