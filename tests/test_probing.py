"""Layerwise linear probing: the closed-form ridge against numpy, batching invariance, planted
signal per layer, and the ``cka-geo probe`` command end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cka_geo.cli import main
from cka_geo.errors import DataError, UsageError
from cka_geo.probing import RidgeStats, fit_ridge, probe_layers, select_alpha, sse_from_stats

# ----------------------------------------------------------------- independent references


def ref_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge on population-standardised features with a free intercept, via lstsq on the
    augmented system [Z; √λ I] w = [Y − Ȳ; 0], λ = alpha·n. Returns raw-space (coef, intercept)."""
    n, d = x.shape
    mu = x.mean(0)
    sd = x.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    z = (x - mu) / sd
    yc = y - y.mean(0)
    a = np.vstack([z, np.sqrt(alpha * n) * np.eye(d)])
    b = np.vstack([yc, np.zeros((d, y.shape[1]))])
    w, *_ = np.linalg.lstsq(a, b, rcond=None)
    coef = w / sd[:, None]
    return coef, y.mean(0) - mu @ coef


def stats_of(x: np.ndarray, y: np.ndarray, folds: int, splits: list[int]) -> RidgeStats:
    s = RidgeStats(x.shape[1], y.shape[1], folds)
    for part_x, part_y in zip(np.split(x, splits), np.split(y, splits), strict=True):
        s.update(torch.from_numpy(part_x), torch.from_numpy(part_y))
    return s


# ----------------------------------------------------------------- closed form vs numpy


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(8, 60),
    d=st.integers(1, 10),
    k=st.integers(1, 3),
    log_alpha=st.floats(-6, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_ridge_from_stats_equals_numpy_lstsq(n: int, d: int, k: int, log_alpha: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 5, size=d) + rng.normal(size=d) * 3
    y = rng.normal(size=(n, k))
    alpha = 10.0**log_alpha
    fit = fit_ridge(stats_of(x, y, 1, [n // 3]).total(), alpha)
    coef, icpt = ref_ridge(x, y, alpha)
    # compare predictions (what the probe is for) and the parameters, in float64
    xt = rng.normal(size=(5, d)) * 2
    np.testing.assert_allclose(fit.predict(xt), xt @ coef + icpt, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(fit.coef, coef, rtol=1e-8, atol=1e-8)


def test_constant_feature_is_ignored() -> None:
    rng = np.random.default_rng(1)
    x = np.c_[rng.normal(size=(40, 3)), np.full(40, 7.0)]
    y = rng.normal(size=(40, 2))
    fit = fit_ridge(stats_of(x, y, 1, []).total(), 1e-3)
    coef, icpt = ref_ridge(x[:, :3], y, 1e-3)
    np.testing.assert_allclose(fit.coef[3], 0.0, atol=1e-12)
    np.testing.assert_allclose(fit.predict(x), x[:, :3] @ coef + icpt, rtol=1e-8, atol=1e-8)


def test_sse_from_stats_equals_direct_sum() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(50, 2))
    fit = fit_ridge(stats_of(x[:30], y[:30], 1, []).total(), 0.1)
    held = stats_of(x[30:], y[30:], 1, []).total()
    direct = float(((y[30:] - fit.predict(x[30:])) ** 2).sum())
    assert sse_from_stats(fit, held) == pytest.approx(direct, rel=1e-9)


def test_cross_validation_equals_explicit_folds() -> None:
    rng = np.random.default_rng(3)
    n, d, folds = 47, 12, 5
    x = rng.normal(size=(n, d))
    y = x[:, :2] @ rng.normal(size=(2, 1)) + rng.normal(size=(n, 1))
    alphas = (1e-4, 1e-1, 10.0)
    chosen, mse = select_alpha(stats_of(x, y, folds, [10, 33]), alphas)
    fold = np.arange(n) % folds
    ref = []
    for a in alphas:
        sse = 0.0
        for f in range(folds):
            coef, icpt = ref_ridge(x[fold != f], y[fold != f], a)
            sse += float(((y[fold == f] - x[fold == f] @ coef - icpt) ** 2).sum())
        ref.append(sse / n)
    np.testing.assert_allclose(mse, ref, rtol=1e-9)
    assert chosen == alphas[int(np.argmin(ref))]


def test_statistics_do_not_depend_on_batching() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(53, 9)), rng.normal(size=(53, 3))
    a = stats_of(x, y, 5, [])
    b = stats_of(x, y, 5, [1, 2, 20, 21, 40])
    for name in ("n", "sx", "xx", "xy", "sy", "yy"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-12)
    (alpha_a, mse_a), (alpha_b, mse_b) = select_alpha(a), select_alpha(b)
    assert alpha_a == alpha_b
    np.testing.assert_allclose(mse_a, mse_b, rtol=1e-10)


# ----------------------------------------------------------------- planted signal per layer


class _Select(nn.Module):
    def __init__(self, i: int) -> None:
        super().__init__()
        self.i = i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.i]  # (B, L, 1, D) -> (B, 1, D): one token


class LayerFeed(nn.Module):
    """A fake model whose block i output is slice i of the input: features are planted."""

    num_prefix_tokens = 0

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Select(i) for i in range(layers)])

    def canonical_sublayers(self) -> dict[str, str]:
        return {f"blocks.{i}": f"blocks.{i}" for i in range(len(self.blocks))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            b(x)
        return x


def planted(n: int, seed: int, task: str, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0 encodes the target linearly (+ noise), layer 1 is pure noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(3, d, generator=torch.Generator().manual_seed(99))
    if task == "classification":
        y = torch.randint(0, 3, (n,), generator=g)
        signal = 3.0 * nn.functional.one_hot(y, 3).float() @ mix
        noise = 0.5
    else:
        y = torch.rand(n, generator=g)
        signal = y[:, None] * mix[0] * 4.0
        noise = 0.01
    l0 = signal + noise * torch.randn(n, d, generator=g)
    l1 = torch.randn(n, d, generator=g)
    return torch.stack([l0, l1], dim=1)[:, :, None, :], y


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_planted_classification_picks_the_informative_layer() -> None:
    (xtr, ytr), (xte, yte) = planted(600, 0, "classification"), planted(300, 1, "classification")
    res = probe_layers(LayerFeed(2), batches(xtr, ytr, 64), batches(xte, yte, 64), task="classification")
    assert res.best == "blocks.0" and res.best_is_intermediate and res.last == "blocks.1"
    assert res.layer("blocks.0").metrics["accuracy"] > 0.95
    assert res.layer("blocks.0").metrics["macro_f1"] > 0.95
    assert res.layer("blocks.1").metrics["accuracy"] < 0.5  # chance is about 1/3
    assert res.chance_accuracy is not None and res.chance_accuracy < 0.45
    assert res.n_train == 600 and res.n_test == 300 and res.num_targets == 3
    # the noise layer gets the strongest ridge the grid offers or close to it
    assert res.layer("blocks.1").alpha >= res.layer("blocks.0").alpha


def test_planted_regression_r2() -> None:
    (xtr, ytr), (xte, yte) = planted(400, 2, "regression"), planted(200, 3, "regression")
    res = probe_layers(LayerFeed(2), batches(xtr, ytr, 50), batches(xte, yte, 50), task="regression")
    assert res.best == "blocks.0"
    assert res.layer("blocks.0").metrics["r2"] > 0.99
    assert res.layer("blocks.0").metrics["rmse"] < 0.03
    assert res.layer("blocks.1").metrics["r2"] < 0.1


def test_probe_result_does_not_depend_on_batch_size() -> None:
    (xtr, ytr), (xte, yte) = planted(250, 4, "classification"), planted(120, 5, "classification")
    a = probe_layers(LayerFeed(2), batches(xtr, ytr, 250), batches(xte, yte, 7))
    b = probe_layers(LayerFeed(2), batches(xtr, ytr, 13), batches(xte, yte, 120))
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.alpha == lb.alpha
        np.testing.assert_allclose(la.cv_mse, lb.cv_mse, rtol=1e-10)
        assert la.metrics == lb.metrics


def test_last_layer_best_is_not_intermediate() -> None:
    x, y = planted(200, 6, "classification")
    x = x.flip(1)  # informative slice last
    res = probe_layers(LayerFeed(2), batches(x, y, 64), batches(x, y, 64))
    assert res.best == "blocks.1" and not res.best_is_intermediate


def test_tie_with_last_layer_is_not_intermediate() -> None:
    x, y = planted(200, 8, "classification")
    x = torch.cat([x[:, :1], x[:, :1]], dim=1)  # both layers carry the same features
    res = probe_layers(LayerFeed(2), batches(x, y, 64), batches(x, y, 64))
    assert res.layers[0].metrics == res.layers[1].metrics
    assert res.best == "blocks.0" and not res.best_is_intermediate


def test_bad_inputs_raise_one_line_errors() -> None:
    x, y = planted(20, 7, "classification")
    with pytest.raises(UsageError):
        probe_layers(LayerFeed(2), batches(x, y, 8), batches(x, y, 8), task="segmentation")
    with pytest.raises(UsageError):
        probe_layers(LayerFeed(2), batches(x, y, 8), batches(x, y, 8), alphas=(0.0,))
    with pytest.raises(DataError, match="no test samples"):
        probe_layers(LayerFeed(2), batches(x, y, 8), [])
    with pytest.raises(DataError, match="never seen"):
        probe_layers(LayerFeed(2), batches(x, y % 2, 8), batches(x, y, 8))


def test_vit_model_and_kinds() -> None:
    from cka_geo.vit import VisionTransformer, ViTConfig

    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(img_size=8, patch_size=4, in_chans=2, embed_dim=8, depth=2, num_heads=1))
    m.train()
    x, y = torch.randn(40, 2, 8, 8), torch.arange(40) % 3
    res = probe_layers(m, batches(x, y, 16), batches(x, y, 16), sublayers=["fc1", "blocks.0"])
    assert [lp.name for lp in res.layers] == ["blocks.0.mlp.fc1", "blocks.0", "blocks.1.mlp.fc1"]
    assert [lp.num_features for lp in res.layers] == [32, 8, 32]
    assert m.training  # mode restored
    tok = probe_layers(m, batches(x, y, 16), batches(x, y, 16), sublayers="blocks.1", pooling="tokens")
    assert tok.n_train == 40 * 4 and tok.n_test == 40 * 4  # 2x2 patch tokens per image


def test_rows_of_one_image_share_a_fold() -> None:
    x = torch.arange(24.0).reshape(12, 2)
    s = RidgeStats(2, 1, 3)
    s.update(x[:6], torch.ones(6, 1), rows_per_group=3)  # images 0, 1
    s.update(x[6:], torch.ones(6, 1), rows_per_group=3)  # images 2, 3
    assert s.n.tolist() == [6.0, 3.0, 3.0] and s.groups == 4 and s.seen == 12
    torch.testing.assert_close(s.sx[1], x[3:6].double().sum(0))  # image 1 whole in fold 1


# ----------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory):
    from cka_geo.checkpoints import save_checkpoint
    from cka_geo.vit import VisionTransformer, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(img_size=16, patch_size=4, in_chans=13, embed_dim=32, depth=3, num_heads=2)
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.pt", VisionTransformer(cfg), cfg)


def test_cli_end_to_end(tiny_ckpt, tmp_path, capsys) -> None:
    out = tmp_path / "probe"
    assert main(["probe", str(tiny_ckpt), "--out", str(out), "--device", "cpu", "--threads", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "best layer: blocks." in stdout and "accuracy" in stdout
    data = json.loads((out / "probe.json").read_text())
    assert [lp["name"] for lp in data["layers"]] == ["blocks.0", "blocks.1", "blocks.2"]
    assert data["task"] == "classification" and data["best"] in stdout
    score = {lp["name"]: (lp["metrics"]["accuracy"], lp["metrics"]["macro_f1"]) for lp in data["layers"]}
    assert data["best_is_intermediate"] == (score[data["best"]] > score["blocks.2"])
    rows = (out / "probe.csv").read_text().splitlines()
    assert rows[0].startswith("layer,block,kind") and len(rows) == 4
    assert (out / "probe_depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_cli_regression(tiny_ckpt, capsys) -> None:
    assert main(["probe", str(tiny_ckpt), "--task", "regression", "--sublayers", "blocks.1", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    assert "r2" in stdout and "best layer: blocks.1" in stdout


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["probe"], "checkpoint"),
        (["probe", "CK", "--task", "segmentation"], "--task"),
        (["probe", "CK", "--batch-size", "0"], "--batch-size"),
        (["probe", "CK", "--sublayers", "fc9"], "fc9"),
        (["probe", "missing.pt"], "missing.pt"),
    ],
)
def test_cli_bad_arguments_exit_2(argv, fragment, tiny_ckpt, capsys) -> None:
    argv = [str(tiny_ckpt) if a == "CK" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and fragment in err


def test_cli_unservable_model_exits_1(tmp_path, capsys) -> None:
    from cka_geo.checkpoints import save_checkpoint
    from cka_geo.vit import VisionTransformer, ViTConfig

    for name, cfg, fragment in [
        ("big.pt", ViTConfig(img_size=160, patch_size=32, in_chans=13, embed_dim=8, depth=1, num_heads=1), "128"),
        ("b5.pt", ViTConfig(img_size=16, patch_size=4, in_chans=5, embed_dim=8, depth=1, num_heads=1), "5-band"),
    ]:
        path = save_checkpoint(tmp_path / name, VisionTransformer(cfg), cfg)
        assert main(["probe", str(path), "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and fragment in err


def test_probing_module_imports_no_matplotlib() -> None:
    code = "import sys, cka_geo.probing, cka_geo.commands.probe; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
