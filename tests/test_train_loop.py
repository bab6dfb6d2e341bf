"""The training loop: learning, exact resume, callbacks that observe without effect, files."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch

from _train_helpers import cls_tiles, seg_tiles, tiny_vit
from cka_geo.train import BaseCallback, TrainConfig, fit
from cka_geo.train.metrics import chance_accuracy
from cka_geo.train.objectives import MAE, SimCLR
from cka_geo.train.tasks import TaskModel, evaluate


def test_segmentation_run_lowers_loss_and_beats_chance(tmp_path):
    train, val = seg_tiles(64, seed=1), seg_tiles(32, seed=2)
    model = TaskModel(tiny_vit(), "segmentation", 2, decoder="linear")
    before = evaluate(model, val)
    res = fit(model, train, TrainConfig(epochs=6, batch_size=16, lr=3e-3, seed=0), tmp_path,
              val_fn=lambda m: evaluate(m, val))
    after = evaluate(model, val)
    assert res.finished and res.epochs_done == 6
    losses = [r["train_loss"] for r in res.history["epochs"]]
    assert losses[-1] < 0.7 * losses[0]
    assert after["loss"] < before["loss"]
    chance = chance_accuracy(val.tensors[1].numpy(), ignore_index=-1)
    assert after["accuracy"] > chance + 0.1, (after, chance)
    assert after["miou"] > 0.5


def test_classification_beats_chance():
    train, val = cls_tiles(90, seed=3), cls_tiles(45, seed=4)
    model = TaskModel(tiny_vit(), "classification", 3)
    fit(model, train, TrainConfig(epochs=8, batch_size=15, lr=3e-3))
    m = evaluate(model, val)
    assert m["accuracy"] > 1 / 3 + 0.25, m


@pytest.mark.parametrize("objective", ["mae", "simclr"])
def test_pretraining_lowers_loss(objective):
    torch.manual_seed(0)
    data = seg_tiles(48, seed=5)
    obj = MAE(tiny_vit(), decoder_dim=32) if objective == "mae" else SimCLR(tiny_vit(), proj_dim=16)
    res = fit(obj, data, TrainConfig(epochs=5, batch_size=16, lr=2e-3))
    losses = [r["train_loss"] for r in res.history["epochs"]]
    assert losses[-1] < losses[0]


def _objective(seed: int = 0) -> MAE:
    return MAE(tiny_vit(seed=seed), decoder_dim=32)


def test_resume_after_kill_gives_identical_weights(tmp_path):
    data = seg_tiles(40, seed=6)
    cfg = dict(epochs=3, batch_size=16, lr=2e-3, seed=7, warmup_steps=2)
    full = _objective()
    fit(full, data, TrainConfig(**cfg), tmp_path / "full")

    first = _objective()
    res1 = fit(first, data, TrainConfig(**cfg, stop_after_epoch=1), tmp_path / "cut")
    assert not res1.finished and res1.epochs_done == 1
    # Scramble every global RNG and start from a fresh model, as a new process would.
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    resumed = _objective(seed=99)
    res2 = fit(resumed, data, TrainConfig(**cfg), tmp_path / "cut", resume=tmp_path / "cut/checkpoints/last.pt")
    assert res2.finished and res2.step == 9
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The resumed run's metrics file holds all epochs.
    rows = json.loads((tmp_path / "cut/metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


def test_kill_inside_second_epoch_then_resume(tmp_path):
    data = seg_tiles(40, seed=6)
    cfg = TrainConfig(epochs=2, batch_size=16, lr=2e-3, seed=1)
    full = _objective()
    fit(full, data, cfg)

    class Kill(BaseCallback):
        def on_step_end(self, ctx):
            if ctx.epoch == 1:
                raise KeyboardInterrupt

    killed = _objective()
    with pytest.raises(KeyboardInterrupt):
        fit(killed, data, cfg, tmp_path, callbacks=[Kill()])
    resumed = _objective(seed=5)
    fit(resumed, data, cfg, tmp_path, resume=tmp_path / "checkpoints/last.pt")
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


class Observer(BaseCallback):
    """Reads the model and consumes global RNG, as a CKA monitor might."""

    def __init__(self):
        self.calls = []

    def on_train_start(self, ctx):
        self.calls.append("start")

    def on_step_end(self, ctx):
        torch.randn(5)
        np.random.rand(3)
        random.random()
        ctx.model.eval()
        x = torch.randn(2, 3, 16, 16)
        feats = ctx.encoder.forward_features(x)
        ctx.log({"probe_norm": float(feats.norm())})
        self.calls.append(("step", ctx.step, ctx.epoch))

    def on_epoch_end(self, ctx):
        ctx.log({"seen_epoch": ctx.epoch})
        self.calls.append(("epoch", ctx.epoch))

    def on_train_end(self, ctx):
        self.calls.append("end")


class NoisyTiles(torch.utils.data.Dataset):
    """Adds noise from torch's global RNG per item (as augmenting datasets do)."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x + 0.1 * torch.randn(x.shape), y


def test_callbacks_observe_without_changing_results(tmp_path):
    data = NoisyTiles(seg_tiles(32, seed=8))
    cfg = TrainConfig(epochs=2, batch_size=16, lr=2e-3, seed=3)
    torch.manual_seed(0)
    plain = _objective()
    fit(plain, data, cfg)
    torch.manual_seed(0)
    watched = _objective()
    obs = Observer()
    fit(watched, data, cfg, tmp_path, callbacks=[obs])
    for k, v in plain.state_dict().items():
        assert torch.equal(v, watched.state_dict()[k]), k
    assert obs.calls[0] == "start" and obs.calls[-1] == "end"
    assert [c for c in obs.calls if c[0] == "step"] == [("step", s, (s - 1) // 2) for s in range(1, 5)]
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sum(1 for r in rows if r["probe_norm"]) == 4
    assert {r["kind"] for r in rows} == {"step", "epoch"}
    hist = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["seen_epoch"] for r in hist["steps"] if "seen_epoch" in r] == [0, 1]


def test_checkpoint_files_and_bad_resume(tmp_path):
    data = seg_tiles(16, seed=9)
    model = _objective()
    fit(model, data, TrainConfig(epochs=2, batch_size=8, keep_checkpoints=1), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch_002.pt", "last.pt"]
    assert not list(tmp_path.rglob("*.tmp"))
    from cka_geo.errors import CheckpointError, UsageError

    with pytest.raises(UsageError, match="batch_size"):
        fit(_objective(), data, TrainConfig(epochs=2, batch_size=4), resume=tmp_path / "checkpoints/last.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        fit(_objective(), data, TrainConfig(epochs=2, batch_size=8), resume=tmp_path / "junk.pt")
