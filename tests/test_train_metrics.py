"""Metrics against hand computations and independent float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cka_geo.errors import DataError
from cka_geo.train.metrics import (
    ConfusionMeter,
    RegressionMeter,
    accuracy,
    chance_accuracy,
    confusion_matrix,
    macro_f1,
    mean_iou,
    r2_score,
    rmse,
)


def test_hand_computed_classification():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    p = torch.tensor([0, 1, 1, 1, 0, 2])
    # class 0: TP1 FP1 FN1 -> F1 0.5, IoU 1/3; class 1: TP2 FP1 FN0 -> F1 0.8, IoU 2/3;
    # class 2: TP1 FP0 FN1 -> F1 2/3, IoU 1/2.
    assert accuracy(p, y) == pytest.approx(4 / 6)
    assert macro_f1(p, y, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert mean_iou(p, y, 3) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert confusion_matrix(p, y, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_ignore_index_and_absent_classes():
    y = torch.tensor([[0, -1], [1, -1]])
    p = torch.tensor([[0, 3], [1, 2]])
    assert mean_iou(p, y, 4, ignore_index=-1) == 1.0  # ignored pixels' predictions do not count
    assert accuracy(p, y, ignore_index=-1) == 1.0
    # class 3 absent from target and prediction: left out of the mean, not counted as 0
    assert macro_f1(torch.tensor([0, 1]), torch.tensor([0, 0]), 4) == pytest.approx((2 / 3 + 0) / 2)
    with pytest.raises(DataError, match="ignore_index"):
        confusion_matrix(p, y, 4)


def _ref_scores(p, y, c, ignore):
    p, y = np.asarray(p).ravel(), np.asarray(y).ravel()
    keep = y != ignore
    p, y = p[keep], y[keep]
    f1s, ious = [], []
    for k in range(c):
        tp = float(np.sum((p == k) & (y == k)))
        fp = float(np.sum((p == k) & (y != k)))
        fn = float(np.sum((p != k) & (y == k)))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
        ious.append(tp / (tp + fp + fn))
    return float(np.mean(p == y)), float(np.mean(f1s)), float(np.mean(ious))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5), st.integers(1, 4), st.integers(0, 10_000))
def test_meter_matches_reference_over_batches(c, nbatches, seed):
    rng = np.random.default_rng(seed)
    meter = ConfusionMeter(c, ignore_index=255)
    ps, ys = [], []
    for _ in range(nbatches):
        y = rng.integers(0, c, size=(2, 3, 3))
        y[rng.random(y.shape) < 0.2] = 255
        p = rng.integers(0, c, size=y.shape)
        meter.update(torch.from_numpy(p), torch.from_numpy(y))
        ps.append(p)
        ys.append(y)
    ref = _ref_scores(np.concatenate(ps), np.concatenate(ys), c, 255)
    if math.isnan(ref[0]):
        return
    got = meter.compute()
    assert got["accuracy"] == pytest.approx(ref[0], abs=1e-12)
    assert got["macro_f1"] == pytest.approx(ref[1], abs=1e-12)
    assert got["miou"] == pytest.approx(ref[2], abs=1e-12)


def test_regression_hand_computed():
    y = torch.tensor([1.0, 2.0, 3.0, 4.0])
    p = torch.tensor([1.0, 2.0, 4.0, 3.0])
    # SSE = 2, SS_tot = 5 -> R² = 0.6; RMSE = sqrt(2/4)
    assert rmse(p, y) == pytest.approx(math.sqrt(0.5))
    assert r2_score(p, y) == pytest.approx(0.6)
    assert math.isnan(r2_score(p, torch.ones(4)))


@settings(max_examples=50, deadline=None)
@given(st.integers(5, 40), st.integers(1, 4), st.integers(0, 10_000))
def test_regression_meter_matches_batch_formula(n, nb, seed):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n) * 3 + 1
    p = y + rng.normal(size=n)
    meter = RegressionMeter()
    for chunk in np.array_split(np.arange(n), nb):
        meter.update(torch.from_numpy(p[chunk]), torch.from_numpy(y[chunk]))
    got = meter.compute()
    ref_r2 = 1 - np.sum((p - y) ** 2) / np.sum((y - y.mean()) ** 2)
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((p - y) ** 2)), rel=1e-10)
    assert got["r2"] == pytest.approx(ref_r2, rel=1e-8, abs=1e-10)


def test_chance_accuracy():
    assert chance_accuracy(np.array([0, 0, 0, 1, -1]), ignore_index=-1) == 0.75
