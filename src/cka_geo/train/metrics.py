"""Evaluation metrics: accuracy, macro-F1, mIoU (with an ignore index), RMSE and R².

Classification and segmentation metrics come from one confusion matrix (rows: true class,
columns: predicted), accumulated in int64 over batches; regression metrics from float64
running sums. Definitions (the tests check them against hand computations):

- accuracy = Σ_c TP_c / N over non-ignored samples (pixels);
- F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c); macro-F1 averages F1_c over the classes that occur
  in the targets or the predictions (sklearn's ``f1_score(average="macro")`` convention);
- IoU_c = TP_c / (TP_c + FP_c + FN_c); mIoU averages IoU_c over the classes whose union is
  non-empty; pixels whose target equals ``ignore_index`` are dropped first;
- RMSE = √(Σ (ŷ − y)² / n); R² = 1 − Σ (ŷ − y)² / Σ (y − ȳ)².
- multi-label (one sigmoid per class, positive when the logit is > 0): micro-F1 from the TP,
  FP, FN summed over classes; macro-F1 over the classes present in targets or predictions;
  mAP = the mean over classes with a positive of the average precision
  AP_c = mean over the positives of the precision at their rank (scores descending, ties
  in sample order; sklearn's ``average_precision_score`` without ties).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cka_geo.errors import DataError


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None
) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts; rows are targets, columns predictions.

    Args:
        pred: Predicted class indices, any shape.
        target: True class indices, same shape.
        num_classes: Number of classes C.
        ignore_index: Target value to drop (e.g. -1 or 255), or None.
    """
    if pred.shape != target.shape:
        raise DataError(f"prediction shape {tuple(pred.shape)} differs from target {tuple(target.shape)}")
    p = pred.reshape(-1).long()
    t = target.reshape(-1).long()
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise DataError(f"target class outside [0, {num_classes}) (set ignore_index?)")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise DataError(f"predicted class outside [0, {num_classes})")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def _scores(cm: torch.Tensor) -> dict[str, float]:
    cm = cm.double()
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    total = cm.sum()
    present = (cm.sum(0) + cm.sum(1)) > 0
    acc = float(tp.sum() / total) if total > 0 else math.nan
    denom_f1 = 2 * tp + fp + fn
    denom_iou = tp + fp + fn
    f1 = torch.where(denom_f1 > 0, 2 * tp / denom_f1.clamp(min=1), torch.zeros_like(tp))
    iou = torch.where(denom_iou > 0, tp / denom_iou.clamp(min=1), torch.zeros_like(tp))
    n = int(present.sum())
    return {
        "accuracy": acc,
        "macro_f1": float(f1[present].sum() / n) if n else math.nan,
        "miou": float(iou[present].sum() / n) if n else math.nan,
    }


def accuracy(pred: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None) -> float:
    """Fraction of correct predictions (ignored targets dropped)."""
    p, t = pred.reshape(-1), target.reshape(-1)
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    return float((p == t).double().mean()) if t.numel() else math.nan


def macro_f1(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean per-class F1 over the classes present in targets or predictions."""
    return _scores(confusion_matrix(pred, target, num_classes, ignore_index))["macro_f1"]


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> float:
    """Mean per-class IoU over classes with a non-empty union; ``ignore_index`` pixels dropped."""
    return _scores(confusion_matrix(pred, target, num_classes, ignore_index))["miou"]


def rmse(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Root mean squared error (float64)."""
    d = pred.double().reshape(-1) - target.double().reshape(-1)
    return float(torch.sqrt((d * d).mean()))


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Coefficient of determination 1 − SS_res / SS_tot (float64); NaN if the target is constant."""
    p, t = pred.double().reshape(-1), target.double().reshape(-1)
    ss_tot = float(((t - t.mean()) ** 2).sum())
    ss_res = float(((p - t) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan


class ConfusionMeter:
    """Accumulates a confusion matrix over batches; :meth:`compute` gives accuracy, macro-F1, mIoU.

    Args:
        num_classes: Number of classes.
        ignore_index: Target value to drop, or None.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and true class indices."""
        self.cm += confusion_matrix(pred.cpu(), target.cpu(), self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, float]:
        """``{"accuracy", "macro_f1", "miou"}`` over everything seen."""
        return _scores(self.cm)


class RegressionMeter:
    """Accumulates float64 sums over batches; :meth:`compute` gives RMSE and R²."""

    def __init__(self) -> None:
        self.n = 0
        self.sum_y = 0.0
        self.sum_y2 = 0.0
        self.sse = 0.0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predictions and targets (same number of elements)."""
        p = pred.detach().double().reshape(-1).cpu()
        t = target.detach().double().reshape(-1).cpu()
        if p.shape != t.shape:
            raise DataError(f"prediction has {p.numel()} values but target has {t.numel()}")
        self.n += t.numel()
        self.sum_y += float(t.sum())
        self.sum_y2 += float((t * t).sum())
        self.sse += float(((p - t) ** 2).sum())

    def compute(self) -> dict[str, float]:
        """``{"rmse", "r2"}`` over everything seen."""
        if self.n == 0:
            return {"rmse": math.nan, "r2": math.nan}
        ss_tot = self.sum_y2 - self.sum_y**2 / self.n
        r2 = 1.0 - self.sse / ss_tot if ss_tot > 1e-12 * max(1.0, self.sum_y2) else math.nan
        return {"rmse": math.sqrt(self.sse / self.n), "r2": r2}


class MultiLabelMeter:
    """Accumulates logits and 0/1 targets (N, C) over batches; micro/macro F1 and mAP."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of logits and targets (B, C)."""
        self.scores.append(logits.detach().double().cpu())
        self.targets.append(target.detach().double().cpu())

    def compute(self) -> dict[str, float]:
        """``f1_micro``, ``f1_macro`` and ``map``."""
        s, t = torch.cat(self.scores), torch.cat(self.targets) > 0.5
        p = s > 0
        tp, fp, fn = (p & t).sum(0).double(), (p & ~t).sum(0).double(), (~p & t).sum(0).double()
        denom = 2 * tp + fp + fn
        micro = float(2 * tp.sum() / denom.sum()) if denom.sum() > 0 else math.nan
        present = denom > 0
        macro = float((2 * tp[present] / denom[present]).mean()) if present.any() else math.nan
        aps = []
        for c in range(s.shape[1]):
            if not t[:, c].any():
                continue
            order = torch.argsort(-s[:, c], stable=True)
            hits = t[order, c].double()
            precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float64)
            aps.append(float((precision * hits).sum() / hits.sum()))
        return {"f1_micro": micro, "f1_macro": macro, "map": float(np.mean(aps)) if aps else math.nan}


def chance_accuracy(targets: np.ndarray | torch.Tensor, ignore_index: int | None = None) -> float:
    """Accuracy of always predicting the most frequent class (the baseline to beat)."""
    t = np.asarray(targets).reshape(-1)
    if ignore_index is not None:
        t = t[t != ignore_index]
    if not t.size:
        return math.nan
    _, counts = np.unique(t, return_counts=True)
    return float(counts.max() / t.size)


__all__ = [
    "ConfusionMeter",
    "RegressionMeter",
    "accuracy",
    "chance_accuracy",
    "confusion_matrix",
    "macro_f1",
    "mean_iou",
    "r2_score",
    "rmse",
]
