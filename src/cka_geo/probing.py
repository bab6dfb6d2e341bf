"""Layerwise linear probing: one closed-form ridge probe per sublayer, memory flat in samples.

:func:`probe_layers` runs every training batch once through the model with the capture path
(:func:`cka_geo.features.capture` + :func:`cka_geo.features.forward_batch`), so all chosen
sublayers are read in the same forward pass, and accumulates per layer, in float64, the
sufficient statistics of a least-squares fit — Σx, XᵀX, XᵀY, ΣY, Σ‖y‖² and the count — split
into ``cv_folds`` folds by image index (image ``i`` goes to fold ``i mod cv_folds``, with all
its rows when ``tokens`` pooling or time-series frames give several rows per image). No
feature matrix is kept: memory is O(folds · d²) per layer, whatever the number of samples.

The probe of a layer (see docs/probing.md):

* features standardised with the training mean and standard deviation (constant features get
  σ = 1 and thus drop out after centring);
* ridge regression with an unpenalised intercept,
  ``W = (ZᵀZ + λI)⁻¹ Zᵀ(Y − Ȳ)``, ``b = Ȳ``, Z the standardised training features, Y the
  targets (one-hot for classification: the "least-squares classifier", predicting the
  argmax of the scores);
* λ = α · n_fit, α chosen from :data:`ALPHAS` by ``cv_folds``-fold cross-validation on the
  training set: the α with the smallest summed held-out squared error (computed exactly from
  the fold statistics; ties go to the larger α), then refitted on the whole training set.

The test batches then run through the model once more (one pass per batch, every layer),
and each layer's probe is scored with the project's metrics
(:mod:`cka_geo.train.metrics`): accuracy and macro-F1 for classification, RMSE and R² for
regression. The best layer is the one with the highest accuracy (ties: macro-F1, then the
earlier layer) or R² (ties: lower RMSE, then the earlier layer); ``best_is_intermediate``
says whether it scores strictly better than the last layer probed (a tie with the last layer
is not an intermediate peak).

Example:
    >>> import torch
    >>> from cka_geo.vit import ViTConfig, VisionTransformer
    >>> m = VisionTransformer(ViTConfig(img_size=8, patch_size=4, in_chans=2, embed_dim=8,
    ...                                 depth=2, num_heads=1)).eval()
    >>> g = torch.Generator().manual_seed(0)
    >>> batches = [(torch.randn(16, 2, 8, 8, generator=g), torch.arange(16) % 2) for _ in range(2)]
    >>> res = probe_layers(m, batches, batches, task="classification")
    >>> [layer.name for layer in res.layers]
    ['blocks.0', 'blocks.1']
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cka_geo.errors import DataError, FeatureError, UsageError
from cka_geo.features import (
    KINDS,
    capture,
    forward_batch,
    resolve_sublayers,
    sublayer_map,
)
from cka_geo.sublayers import parse

TASKS: tuple[str, ...] = ("classification", "regression")

ALPHAS: tuple[float, ...] = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
"""Ridge strengths per sample: λ = α · n on standardised features (ZᵀZ has diagonal n)."""


# --------------------------------------------------------------------------- statistics


class RidgeStats:
    """Float64 sufficient statistics of a linear least-squares fit, per fold.

    For fold ``f`` it holds ``n[f]``, ``sx[f] = Σx``, ``xx[f] = XᵀX``, ``xy[f] = XᵀY``,
    ``sy[f] = ΣY`` and ``yy[f] = Σ‖y‖²``. Target columns grow when a larger class index
    shows up (classification), so the number of classes need not be known in advance.

    Args:
        num_features: Feature width d.
        num_targets: Target columns k (classes for one-hot targets; grows on demand).
        folds: Number of folds; row ``i`` of the whole stream goes to fold ``i mod folds``.
        device: Where the sums live (the features' device).
    """

    def __init__(self, num_features: int, num_targets: int, folds: int, device: torch.device | str = "cpu") -> None:
        d, k, f = num_features, num_targets, folds
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.folds = folds
        self.seen = 0
        self.groups = 0
        self.n = torch.zeros(f, **kw)
        self.sx = torch.zeros(f, d, **kw)
        self.xx = torch.zeros(f, d, d, **kw)
        self.xy = torch.zeros(f, d, k, **kw)
        self.sy = torch.zeros(f, k, **kw)
        self.yy = torch.zeros(f, **kw)

    @property
    def num_targets(self) -> int:
        """Current number of target columns k."""
        return int(self.xy.shape[2])

    def grow(self, k: int) -> None:
        """Pad the target statistics with zero columns up to ``k`` columns."""
        extra = k - self.num_targets
        if extra > 0:
            self.xy = torch.nn.functional.pad(self.xy, (0, extra))
            self.sy = torch.nn.functional.pad(self.sy, (0, extra))

    def update(self, x: torch.Tensor, y: torch.Tensor, rows_per_group: int = 1) -> None:
        """Add rows ``x`` (b, d) with targets ``y`` (b, k).

        Rows come in groups of ``rows_per_group`` consecutive rows (the tokens or frames of
        one image); group ``g`` of the whole stream goes to fold ``g mod folds``, so a
        group never straddles two folds.
        """
        x = x.to(self.xx.device, torch.float64)
        y = y.to(self.xx.device, torch.float64)
        group = torch.arange(x.shape[0], device=x.device) // rows_per_group
        fold = (group + self.groups) % self.folds
        self.seen += x.shape[0]
        self.groups += -(-x.shape[0] // rows_per_group)
        for f in range(self.folds):
            sel = fold == f
            if self.folds > 1:
                if not bool(sel.any()):
                    continue
                xf, yf = x[sel], y[sel]
            else:
                xf, yf = x, y
            self.n[f] += xf.shape[0]
            self.sx[f] += xf.sum(0)
            self.xx[f] += xf.T @ xf
            self.xy[f] += xf.T @ yf
            self.sy[f] += yf.sum(0)
            self.yy[f] += (yf * yf).sum()

    def total(self, exclude: int | None = None) -> dict[str, np.ndarray]:
        """The statistics summed over all folds (or all but ``exclude``) as numpy float64."""
        keep = [f for f in range(self.folds) if f != exclude]
        return {
            name: getattr(self, name)[keep].sum(0).cpu().numpy()
            for name in ("n", "sx", "xx", "xy", "sy", "yy")
        }

    def fold(self, f: int) -> dict[str, np.ndarray]:
        """The statistics of fold ``f`` alone as numpy float64."""
        return {name: getattr(self, name)[f].cpu().numpy() for name in ("n", "sx", "xx", "xy", "sy", "yy")}


@dataclass
class RidgeFit:
    """A linear probe in raw feature coordinates: scores = x @ coef + intercept.

    Attributes:
        coef: (d, k) float64.
        intercept: (k,) float64.
        alpha: The per-sample ridge strength used (λ = alpha · n).
        mean: (d,) feature means used for standardisation.
        scale: (d,) feature standard deviations used (1 for constant features).
    """

    coef: np.ndarray
    intercept: np.ndarray
    alpha: float
    mean: np.ndarray
    scale: np.ndarray

    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Scores (rows, k) of raw features ``x`` (rows, d)."""
        xa = x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float64)
        return xa @ self.coef + self.intercept


def _standardised(s: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, scale, ZᵀZ, Zᵀ(Y − Ȳ) and Ȳ from raw statistics."""
    n = float(s["n"])
    if n < 2:
        raise FeatureError(f"a ridge probe needs at least 2 training samples, got {int(n)}")
    mu = s["sx"] / n
    ybar = s["sy"] / n
    cxx = s["xx"] - n * np.outer(mu, mu)
    cxy = s["xy"] - n * np.outer(mu, ybar)
    var = np.clip(np.diag(cxx) / n, 0.0, None)
    scale = np.sqrt(var)
    tiny = scale <= 1e-12 * max(1.0, float(np.abs(mu).max(initial=0.0)))
    scale = np.where(tiny, 1.0, scale)
    zz = cxx / np.outer(scale, scale)
    zz[tiny, :] = 0.0
    zz[:, tiny] = 0.0
    zy = cxy / scale[:, None]
    zy[tiny, :] = 0.0
    return mu, scale, (zz + zz.T) / 2, zy, ybar


def _fits(s: dict[str, np.ndarray], alphas: Sequence[float]) -> list[RidgeFit]:
    """One ridge fit per alpha from the statistics ``s`` (one eigendecomposition for all)."""
    n = float(s["n"])
    mu, scale, zz, zy, ybar = _standardised(s)
    evals, evecs = np.linalg.eigh(zz)
    evals = np.clip(evals, 0.0, None)
    proj = evecs.T @ zy
    out = []
    for alpha in alphas:
        w = evecs @ (proj / (evals + alpha * n)[:, None])
        coef = w / scale[:, None]
        out.append(RidgeFit(coef, ybar - mu @ coef, float(alpha), mu, scale))
    return out


def fit_ridge(s: dict[str, np.ndarray], alpha: float) -> RidgeFit:
    """The ridge probe for one alpha from accumulated statistics (see the module docstring).

    Args:
        s: Statistics as :meth:`RidgeStats.total` returns them.
        alpha: Per-sample ridge strength; λ = alpha · n on standardised features.

    Returns:
        The fit in raw feature coordinates.
    """
    return _fits(s, [alpha])[0]


def sse_from_stats(fit: RidgeFit, s: dict[str, np.ndarray]) -> float:
    """Σ‖y − (x·coef + intercept)‖² over the samples summarised by ``s``, exactly."""
    a, c = fit.coef, fit.intercept
    n = float(s["n"])
    pred2 = float(np.sum(a * (s["xx"] @ a))) + 2.0 * float(s["sx"] @ a @ c) + n * float(c @ c)
    cross = float(np.sum(a * s["xy"])) + float(s["sy"] @ c)
    return float(s["yy"]) - 2.0 * cross + pred2


def select_alpha(stats: RidgeStats, alphas: Sequence[float] = ALPHAS) -> tuple[float, list[float]]:
    """Cross-validated alpha: smallest summed held-out squared error over the folds.

    Args:
        stats: Accumulated statistics with ``folds >= 2`` (a single fold returns the
            smallest alpha and NaN errors).
        alphas: The grid.

    Returns:
        ``(alpha, cv_mse)``: the chosen alpha (ties: the larger) and the held-out mean squared
        error (per sample, summed over target columns) of each alpha in ``alphas``.
    """
    if stats.folds < 2:
        return float(min(alphas)), [math.nan] * len(alphas)
    sse = np.zeros(len(alphas))
    total_n = 0.0
    for f in range(stats.folds):
        held = stats.fold(f)
        if float(held["n"]) == 0:
            continue
        total_n += float(held["n"])
        for i, fit in enumerate(_fits(stats.total(exclude=f), alphas)):
            sse[i] += sse_from_stats(fit, held)
    mse = (sse / max(total_n, 1.0)).tolist()
    best = None
    for i in sorted(range(len(alphas)), key=lambda j: -alphas[j]):
        if best is None or mse[i] < mse[best] * (1 - 1e-12):
            best = i
    return float(alphas[best]), mse  # type: ignore[index]


# --------------------------------------------------------------------------- results


@dataclass
class LayerProbe:
    """The probe of one sublayer.

    Attributes:
        name: Canonical sublayer name.
        block: Block index (None for a name outside the canonical scheme).
        kind: ``attn``, ``fc1``, ``act``, ``fc2``, ``block`` or None.
        num_features: Feature width d.
        alpha: Chosen ridge strength per sample.
        cv_mse: Held-out mean squared error of each alpha in :attr:`ProbeResult.alphas`.
        metrics: Test metrics: ``accuracy``/``macro_f1`` or ``rmse``/``r2``.
    """

    name: str
    block: int | None
    kind: str | None
    num_features: int
    alpha: float
    cv_mse: list[float]
    metrics: dict[str, float]


@dataclass
class ProbeResult:
    """What :func:`probe_layers` returns.

    Attributes:
        task: ``classification`` or ``regression``.
        pooling: Token pooling used.
        layers: One :class:`LayerProbe` per sublayer, in probing order.
        best: Name of the best layer (see the module docstring).
        best_metric: The metric that chose it (``accuracy`` or ``r2``).
        last: Name of the last layer probed.
        best_is_intermediate: Whether ``best`` scores strictly better than ``last`` (on the
            best metric, then macro-F1 or RMSE).
        n_train: Training rows (examples; tokens for ``tokens`` pooling).
        n_test: Test rows.
        num_targets: Classes (classification) or target columns (regression).
        chance_accuracy: Majority-class test accuracy (classification), else None.
        alphas: The ridge grid.
        cv_folds: Cross-validation folds.
    """

    task: str
    pooling: str
    layers: list[LayerProbe]
    best: str
    best_metric: str
    last: str
    best_is_intermediate: bool
    n_train: int
    n_test: int
    num_targets: int
    chance_accuracy: float | None
    alphas: list[float]
    cv_folds: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The test metric columns of the task."""
        return ("accuracy", "macro_f1") if self.task == "classification" else ("rmse", "r2")

    def layer(self, name: str) -> LayerProbe:
        """The probe of sublayer ``name``."""
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN written as null)."""
        return _nan_to_none(asdict(self))

    def to_csv(self) -> str:
        """One row per layer: name, block, kind, features, alpha, then the metrics."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["layer", "block", "kind", "num_features", "alpha", *self.metric_names, "best"])
        for lp in self.layers:
            w.writerow([
                lp.name, "" if lp.block is None else lp.block, lp.kind or "", lp.num_features,
                repr(lp.alpha), *(repr(lp.metrics[m]) for m in self.metric_names), int(lp.name == self.best),
            ])
        return buf.getvalue()

    def format_table(self) -> str:
        """A plain-text table of the layers and the best layer."""
        cols = self.metric_names
        width = max(5, *(len(lp.name) for lp in self.layers))
        lines = [f"{'layer':<{width}}  {'alpha':>8}  " + "  ".join(f"{c:>9}" for c in cols)]
        for lp in self.layers:
            mark = "  *" if lp.name == self.best else ""
            lines.append(
                f"{lp.name:<{width}}  {lp.alpha:>8.0e}  "
                + "  ".join(f"{lp.metrics[c]:>9.4f}" for c in cols) + mark
            )
        where = "intermediate" if self.best_is_intermediate else "the last layer probed"
        score = self.layer(self.best).metrics[self.best_metric]
        lines.append(f"best layer: {self.best} ({self.best_metric} {score:.4f}; {where})")
        if self.chance_accuracy is not None:
            lines.append(f"chance (majority class) accuracy: {self.chance_accuracy:.4f}")
        return "\n".join(lines)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- probing


def _resolve(model: nn.Module, sublayers: str | Sequence[str]) -> list[str]:
    """Kinds (``block``, ``fc1`` …) and/or canonical names -> names in canonical order."""
    items = [sublayers] if isinstance(sublayers, str) else list(sublayers)
    if not items:
        raise UsageError("no sublayers to probe")
    kinds = [s for s in items if s in KINDS]
    names = [s for s in items if s not in KINDS]
    chosen: list[str] = []
    if kinds:
        chosen += resolve_sublayers(model, kinds=list(dict.fromkeys(kinds)))
    if names:
        chosen += resolve_sublayers(model, list(dict.fromkeys(names)))
    order = list(sublayer_map(model))
    return sorted(dict.fromkeys(chosen), key=order.index)


def _targets(y: Any, task: str, rows: int, batch: int, where: str) -> torch.Tensor:
    """Targets of one batch as (rows, ·): class indices (rows,) or regression (rows, k)."""
    y = torch.as_tensor(y)
    if y.shape[0] != batch:
        raise DataError(f"{where}: {y.shape[0]} targets for {batch} images")
    per = rows // batch
    if task == "classification":
        if y.ndim != 1 or (y.is_floating_point() and not bool(torch.all(y == y.round()))):
            raise DataError(f"{where}: classification targets must be class indices of shape (batch,), got {tuple(y.shape)}")
        y = y.long()
        if y.numel() and int(y.min()) < 0:
            raise DataError(f"{where}: negative class index {int(y.min())}")
    else:
        y = y.double().reshape(batch, -1)
        if not bool(torch.isfinite(y).all()):
            raise DataError(f"{where}: non-finite regression targets")
    return y.repeat_interleave(per, dim=0) if per > 1 else y


def _unpack(item: Any, where: str) -> tuple[torch.Tensor, Any]:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"{where}: batches must be (images, targets) pairs, got {type(item).__name__}")
    return item[0], item[1]


def _check_finite(feats: dict[str, torch.Tensor], where: str) -> None:
    for name, f in feats.items():
        if not bool(torch.isfinite(f).all()):
            raise FeatureError(f"{where}: sublayer {name!r} gave NaN or Inf features")


def probe_layers(
    model: nn.Module,
    train_batches: Iterable[Any],
    test_batches: Iterable[Any],
    *,
    task: str = "classification",
    sublayers: str | Sequence[str] = ("block",),
    pooling: str = "mean",
    alphas: Sequence[float] = ALPHAS,
    cv_folds: int = 5,
    num_classes: int | None = None,
    time_mode: str = "frames",
) -> ProbeResult:
    """Fit one ridge linear probe per sublayer on ``train_batches``, score it on ``test_batches``.

    Each batch goes through the model once (eval mode, no gradients) with every chosen
    sublayer hooked; per layer only float64 sums are kept (see the module docstring).

    Args:
        model: Any model the capture path handles (``canonical_sublayers()`` or timm names).
        train_batches: Iterable of ``(images, targets)``: images (B, C, H, W) (or
            (B, T, C, H, W), see ``time_mode``), targets (B,) class indices for
            classification, (B,) or (B, k) values for regression. Iterated once.
        test_batches: The same for the test set. Iterated once, after the fit.
        task: ``"classification"`` or ``"regression"``.
        sublayers: Kinds (``attn``, ``fc1``, ``act``, ``fc2``, ``block``) and/or canonical
            names; default every block output.
        pooling: Token pooling (``mean``, ``cls``, ``flatten``, ``tokens``); with ``tokens``
            each patch token is a row carrying its image's target.
        alphas: Ridge grid (per sample, on standardised features).
        cv_folds: Folds for choosing alpha (images assigned by index modulo ``cv_folds``);
            1 disables the search (the smallest alpha is used).
        num_classes: Classes for classification; default 1 + the largest training label.
        time_mode: For time-series input, as :func:`cka_geo.features.forward_batch`.

    Returns:
        A :class:`ProbeResult`.

    Raises:
        UsageError: Unknown task, sublayers, pooling, bad alphas or folds.
        DataError: Malformed batches or targets, empty train or test set, a test class
            index ``>= num_classes``.
        FeatureError: NaN/Inf features, or fewer than 2 training rows.
    """
    from cka_geo.train.metrics import ConfusionMeter, RegressionMeter, chance_accuracy

    if task not in TASKS:
        raise UsageError(f"task must be classification or regression, got {task!r}")
    alphas = [float(a) for a in alphas]
    if not alphas or any(not (a > 0 and math.isfinite(a)) for a in alphas):
        raise UsageError(f"alphas must be positive finite numbers, got {alphas!r}")
    if isinstance(cv_folds, bool) or not isinstance(cv_folds, int) or cv_folds < 1:
        raise UsageError(f"cv_folds must be an integer >= 1, got {cv_folds!r}")
    if num_classes is not None and (task != "classification" or num_classes < 1):
        raise UsageError(f"num_classes={num_classes!r} needs task='classification' and a value >= 1")
    names = _resolve(model, sublayers)
    was_training = model.training
    model.eval()
    try:
        stats: dict[str, RidgeStats] = {}
        with capture(model, names, pooling=pooling) as cap:
            for bi, item in enumerate(train_batches):
                where = f"train batch {bi}"
                x, y_raw = _unpack(item, where)
                feats = forward_batch(model, x, cap, time_mode=time_mode).features
                _check_finite(feats, where)
                rows = next(iter(feats.values())).shape[0]
                batch = x.shape[0] * (x.shape[1] if x.ndim == 5 and time_mode == "frames" else 1)
                if x.ndim == 5 and time_mode == "frames":
                    y_raw = torch.as_tensor(y_raw).repeat_interleave(x.shape[1], dim=0)
                y = _targets(y_raw, task, rows, batch, where)
                if task == "classification":
                    k = num_classes if num_classes is not None else int(y.max()) + 1 if y.numel() else 1
                    if num_classes is not None and y.numel() and int(y.max()) >= num_classes:
                        raise DataError(f"{where}: class index {int(y.max())} >= num_classes={num_classes}")
                    yt = torch.nn.functional.one_hot(y, max(k, 1)).double()
                else:
                    yt = y
                for name, f in feats.items():
                    st = stats.get(name)
                    if st is None:
                        st = stats[name] = RidgeStats(f.shape[1], yt.shape[1], cv_folds, f.device)
                    elif task == "regression" and yt.shape[1] != st.num_targets:
                        raise DataError(f"{where}: {yt.shape[1]} target columns, earlier batches had {st.num_targets}")
                    st.grow(yt.shape[1])
                    if yt.shape[1] < st.num_targets:
                        yt = torch.nn.functional.pad(yt, (0, st.num_targets - yt.shape[1]))
                    st.update(f, yt, rows_per_group=rows // x.shape[0])
            if not stats or next(iter(stats.values())).seen == 0:
                raise DataError("no training samples to fit the probes on")
            k = next(iter(stats.values())).num_targets
            fits: dict[str, RidgeFit] = {}
            cv: dict[str, list[float]] = {}
            for name in names:
                alpha, cv[name] = select_alpha(stats[name], alphas)
                fits[name] = fit_ridge(stats[name].total(), alpha)
            n_train = next(iter(stats.values())).seen
            del stats

            meters: dict[str, Any] = {
                name: ConfusionMeter(k) if task == "classification" else RegressionMeter() for name in names
            }
            test_targets: list[torch.Tensor] = []
            n_test = 0
            for bi, item in enumerate(test_batches):
                where = f"test batch {bi}"
                x, y_raw = _unpack(item, where)
                feats = forward_batch(model, x, cap, time_mode=time_mode).features
                _check_finite(feats, where)
                rows = next(iter(feats.values())).shape[0]
                batch = x.shape[0] * (x.shape[1] if x.ndim == 5 and time_mode == "frames" else 1)
                if x.ndim == 5 and time_mode == "frames":
                    y_raw = torch.as_tensor(y_raw).repeat_interleave(x.shape[1], dim=0)
                y = _targets(y_raw, task, rows, batch, where).cpu()
                if task == "classification" and y.numel() and int(y.max()) >= k:
                    raise DataError(f"{where}: class index {int(y.max())} never seen in training ({k} classes)")
                if task == "regression" and y.shape[1] != k:
                    raise DataError(f"{where}: {y.shape[1]} target columns, training had {k}")
                n_test += rows
                if task == "classification":
                    test_targets.append(y)
                for name, f in feats.items():
                    scores = torch.from_numpy(fits[name].predict(f))
                    pred = scores.argmax(dim=1) if task == "classification" else scores
                    meters[name].update(pred, y)
            if n_test == 0:
                raise DataError("no test samples to score the probes on")
    finally:
        model.train(was_training)

    layers: list[LayerProbe] = []
    for name in names:
        m = meters[name].compute()
        metrics = (
            {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
            if task == "classification"
            else {"rmse": m["rmse"], "r2": m["r2"]}
        )
        parsed = parse(name)
        fit = fits[name]
        layers.append(LayerProbe(
            name=name, block=parsed[0] if parsed else None, kind=parsed[1] if parsed else None,
            num_features=int(fit.coef.shape[0]), alpha=fit.alpha, cv_mse=cv[name], metrics=metrics,
        ))
    best_metric = "accuracy" if task == "classification" else "r2"

    def key(i: int) -> tuple[float, ...]:
        m = layers[i].metrics
        main = m[best_metric] if math.isfinite(m[best_metric]) else -math.inf
        if task == "classification":
            f1 = m["macro_f1"] if math.isfinite(m["macro_f1"]) else -math.inf
            return (main, f1, -i)
        return (main, -m["rmse"] if math.isfinite(m["rmse"]) else -math.inf, -i)

    best_i = max(range(len(layers)), key=key)
    chance = chance_accuracy(torch.cat(test_targets).numpy()) if task == "classification" else None
    return ProbeResult(
        task=task, pooling=pooling, layers=layers, best=layers[best_i].name, best_metric=best_metric,
        last=layers[-1].name, best_is_intermediate=key(best_i)[:-1] > key(len(layers) - 1)[:-1], n_train=n_train,
        n_test=n_test, num_targets=k, chance_accuracy=chance, alphas=alphas, cv_folds=cv_folds,
    )


# --------------------------------------------------------------------------- output


def write_probe(result: ProbeResult, out: str | os.PathLike[str], *, figure: bool = True) -> list[Path]:
    """Write ``probe.json``, ``probe.csv`` and (``figure``) ``probe_depth.png`` into ``out``.

    Each file is written atomically.

    Returns:
        The paths written.
    """
    from cka_geo.atomic import write_text_atomic

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    written = [d / "probe.json", d / "probe.csv"]
    write_text_atomic(written[0], json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    write_text_atomic(written[1], result.to_csv())
    if figure:
        written.append(plot_probe_depth(result, d / "probe_depth.png"))
    return written


def plot_probe_depth(result: ProbeResult, path: str | os.PathLike[str]) -> Path:
    """Draw the probe metric against depth (one line per sublayer kind) into a PNG, atomically.

    The x axis is the block index (the position in probing order for names outside the
    canonical scheme); the best layer is circled; for classification a dashed line marks
    the majority-class accuracy.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from cka_geo.atomic import atomic_path

    metric = result.best_metric
    label = {"accuracy": "test accuracy", "r2": "test R²"}[metric]
    fig = Figure(figsize=(6.0, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    series: dict[str, list[tuple[float, float, str]]] = {}
    for i, lp in enumerate(result.layers):
        x = float(lp.block) if lp.block is not None else float(i)
        series.setdefault(lp.kind or "other", []).append((x, lp.metrics[metric], lp.name))
    for kind, pts in series.items():
        xs, ys, _ = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=kind)
        for x, y, name in pts:
            if name == result.best:
                ax.plot([x], [y], marker="o", markersize=14, markerfacecolor="none", color="black")
    if result.chance_accuracy is not None:
        ax.axhline(result.chance_accuracy, linestyle="--", color="grey", label="majority class")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("block")
    ax.set_ylabel(label)
    ax.set_title(f"linear probe per depth ({result.task}); best {result.best}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    dest = Path(path)
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png")
    return dest


__all__ = [
    "ALPHAS",
    "TASKS",
    "LayerProbe",
    "ProbeResult",
    "RidgeFit",
    "RidgeStats",
    "fit_ridge",
    "plot_probe_depth",
    "probe_layers",
    "select_alpha",
    "sse_from_stats",
    "write_probe",
]
