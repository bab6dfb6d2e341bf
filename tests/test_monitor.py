"""CKAMonitor: starts at 1, moves as training moves the model, and changes nothing in the run."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from torch import nn

from _train_helpers import cls_tiles, tiny_vit
from cka_geo.accumulator import MinibatchCKA
from cka_geo.checkpoints import save_checkpoint
from cka_geo.errors import DataError, UsageError
from cka_geo.features import capture, forward_batch
from cka_geo.monitor import CKAMonitor, CKATrajectory, observing, plot_trajectory
from cka_geo.train import TrainConfig, fit
from cka_geo.train.tasks import TaskModel

NAMES = ["blocks.0.attn", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1", "blocks.1"]


def _probes(n: int = 24, seed: int = 11) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _run(monitor_factory=None):
    torch.manual_seed(0)
    model = TaskModel(tiny_vit(seed=1), "classification", 3)
    cbs = [] if monitor_factory is None else [monitor_factory(model)]
    res = fit(model, cls_tiles(24, seed=3), TrainConfig(epochs=2, batch_size=12, lr=5e-3, seed=5), callbacks=cbs)
    return model, res, cbs


def test_trajectory_starts_at_one_moves_below_and_the_run_is_unchanged():
    plain, res_plain, _ = _run()
    watched, res_watched, (mon,) = _run(
        lambda m: CKAMonitor(copy.deepcopy(m.encoder), _probes(16), NAMES, period=2, batch_size=8)
    )
    # Bit-identical weights and identical logged losses with and without the monitor.
    for k, v in plain.state_dict().items():
        assert torch.equal(v, watched.state_dict()[k]), k
    loss = lambda res: [r["loss"] for r in res.history["steps"] if "loss" in r]  # noqa: E731
    assert loss(res_plain) == loss(res_watched) and len(loss(res_plain)) == 4
    assert [r["train_loss"] for r in res_plain.history["epochs"]] == [r["train_loss"] for r in res_watched.history["epochs"]]

    traj = mon.trajectory
    assert traj.names == NAMES
    assert traj.steps == [0, 2, 4]
    assert traj.values.shape == (3, len(NAMES))
    np.testing.assert_allclose(traj.values[0], 1.0, atol=1e-6)
    assert np.all(traj.values[-1] < 1 - 1e-3), traj.values  # training moved every sublayer
    assert np.all(traj.values[-1] < traj.values[1] + 1e-9) and traj.values.min() < 0.95
    # Logged into the run's metrics, stamped with the step.
    logged = [r for r in res_watched.history["steps"] if "cka/blocks.1" in r]
    assert [r["step"] for r in logged] == traj.steps
    assert [r["cka/blocks.1.mlp.fc1"] for r in logged] == list(traj.values[:, 2])


def test_values_equal_the_engine_on_captured_features():
    ref, model = tiny_vit(seed=1), tiny_vit(seed=2)
    probes = _probes(20)
    mon = CKAMonitor(ref, probes, NAMES, batch_size=8)  # 8 + 8, last 4 kept (n >= 4)
    values = mon.measure(model, step=3)
    acc = MinibatchCKA()
    with capture(ref.eval(), NAMES) as ca, capture(model.eval(), NAMES) as cb:
        for i in range(0, 20, 8):
            x = probes[i : i + 8]
            acc.update(forward_batch(ref, x, ca).features, forward_batch(model, x, cb).features)
    res = acc.compute()
    assert res.batch_sizes == [8, 8, 4] == mon.last_result.batch_sizes
    # Same per-batch computation, same summation order: exactly equal.
    assert values == {f"cka/{n}": float(res.matrix[i, i]) for i, n in enumerate(NAMES)}
    assert all(v < 0.999 for v in values.values())


def test_passing_the_live_model_makes_its_current_state_the_reference():
    model = tiny_vit(seed=1)
    mon = CKAMonitor(model, _probes(16), NAMES, batch_size=8)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.add_(0.3 * torch.randn_like(model.blocks[0].mlp.fc1.weight))
    after = mon.compute(model)
    assert after["blocks.0.mlp.fc1"] < 0.99 and after["blocks.0.attn"] == pytest.approx(1.0, abs=1e-6)


def test_reference_from_a_checkpoint_file(tmp_path):
    ref, model = tiny_vit(seed=1), tiny_vit(seed=2)
    path = save_checkpoint(tmp_path / "pre.safetensors", ref, ref.cfg)
    from_module = CKAMonitor(ref, _probes(16), NAMES, batch_size=8).compute(model)
    from_file = CKAMonitor(str(path), _probes(16), NAMES, batch_size=8).compute(model)
    assert from_module == from_file


class _BNModel(nn.Module):
    """Patch tokens -> linear -> BatchNorm -> dropout; one canonical 'block'."""

    num_prefix_tokens = 0

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 16, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)
        self.block = nn.Identity()

    def canonical_sublayers(self) -> dict[str, str]:
        return {"blocks.0": "block"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # (B, 16, 48)
        h = self.bn(self.proj(t).transpose(1, 2)).transpose(1, 2)
        return self.block(self.drop(h))


def _rng():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def test_measure_outside_any_loop_consumes_no_rng_and_keeps_modes_and_statistics():
    torch.manual_seed(0)
    model = _BNModel().train()
    model.proj.eval()  # a mixed pattern of flags must come back as it was
    reference = copy.deepcopy(model)
    before = _rng()
    mon = CKAMonitor(reference, _probes(16), ["blocks.0"], batch_size=8)  # runs the reference
    assert torch.equal(before[0], torch.get_rng_state()) and before[2] == random.getstate()
    assert reference.training and not reference.proj.training
    with torch.no_grad():
        model.proj.weight.add_(0.05)
    bn_before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    before = _rng()
    v = mon.measure(model, step=1)["cka/blocks.0"]
    after = _rng()
    assert torch.equal(before[0], after[0])
    assert all(np.array_equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    assert before[2] == after[2]
    assert [m.training for m in model.modules()] == [True, False, True, True, True]
    for k, t in model.bn.state_dict().items():
        assert torch.equal(t, bn_before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert 0 < v < 1
    # The same forward pass outside the monitor would have moved BatchNorm and the RNG.
    model(_probes(8))
    assert not torch.equal(model.bn.running_mean, bn_before["running_mean"])
    assert not torch.equal(torch.get_rng_state(), after[0])


def test_observing_restores_state_when_the_body_raises():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    state = torch.get_rng_state()
    with pytest.raises(KeyError), observing(m):
        torch.randn(4)
        raise KeyError("x")
    assert m.training and m[1].training and torch.equal(state, torch.get_rng_state())


def test_target_selects_the_module_and_a_small_last_batch_is_dropped_with_a_warning():
    model = TaskModel(tiny_vit(seed=1), "classification", 3)
    with pytest.warns(RuntimeWarning, match="dropping the last 2 of 18"):
        mon = CKAMonitor(copy.deepcopy(model.encoder), _probes(18), NAMES, batch_size=8, target="encoder")
    assert mon.compute(model) == pytest.approx(dict.fromkeys(NAMES, 1.0), abs=1e-6)
    assert mon.last_result.batch_sizes == [8, 8]
    with pytest.raises(UsageError, match="no submodule 'decoder'"):
        CKAMonitor(model.encoder, _probes(8), NAMES, batch_size=8, target="decoder").compute(model)
    with pytest.raises(UsageError, match="period"):
        CKAMonitor(model.encoder, _probes(8), NAMES, period=-1)
    with pytest.raises(DataError, match="probes"):
        CKAMonitor(model.encoder, torch.randn(8, 3, 16), NAMES)


def test_plot_trajectory_writes_a_png_and_trajectory_round_trips(tmp_path):
    traj = CKATrajectory(["blocks.0.attn", "blocks.0"])
    for step, row in [(0, [1.0, 1.0]), (5, [0.97, 0.99]), (10, [0.9, float("nan")])]:
        traj.append(step, row, epoch=step // 5)
    out = plot_trajectory(traj, tmp_path / "traj.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = CKATrajectory.from_dict(traj.to_dict())
    assert back.steps == traj.steps and back.epochs == traj.epochs
    np.testing.assert_array_equal(back.values, traj.values)
    with pytest.raises(UsageError):
        plot_trajectory(CKATrajectory(["a"]), tmp_path / "empty.png")
