"""CKACallback: a tiny Lightning fit logs cka/<sublayer> at each validation epoch end."""

from __future__ import annotations

import copy
import csv
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from _train_helpers import cls_tiles, tiny_vit

pl = pytest.importorskip("lightning.pytorch")

from cka_geo.integrations.lightning import CKACallback  # noqa: E402

NAMES = ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.1"]


class TinyClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = tiny_vit(seed=1)
        self.head = torch.nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.forward_features(x)[:, 0])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def test_tiny_fit_logs_the_expected_keys(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    module = TinyClassifier()
    probes = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    cb = CKACallback(copy.deepcopy(module.encoder), probes, NAMES, batch_size=8, log_start=True)
    data = cls_tiles(24, seed=2)
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=3, limit_val_batches=1, accelerator="cpu", devices=1,
        logger=CSVLogger(tmp_path, name="run"), callbacks=[cb], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*num_workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))

    with open(tmp_path / "run" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = {k for r in rows for k, v in r.items() if v != ""}
    assert {f"cka/{n}" for n in NAMES} <= keys
    assert {f"cka_start/{n}" for n in NAMES} <= keys
    logged = [r for r in rows if r.get("cka/blocks.1", "") != ""]
    assert [int(r["epoch"]) for r in logged] == [0, 1]  # once per validation epoch, no sanity check
    assert int(logged[0]["step"]) < int(logged[1]["step"])
    start = [float(r["cka_start/blocks.1"]) for r in rows if r.get("cka_start/blocks.1", "") != ""]
    assert start == [pytest.approx(1.0, abs=1e-6)]
    # The trajectory: start, then one per validation epoch; values drop as the encoder trains.
    traj = cb.trajectory
    assert traj.steps == [0, 3, 6] and traj.names == NAMES
    assert abs(traj.values[0] - 1).max() < 1e-6 and (traj.values[-1] < 1 - 1e-4).all()
    assert float(logged[-1]["cka/blocks.1"]) == pytest.approx(traj.values[-1, 2], rel=1e-6)
    assert module.training  # mode restored after each measurement
