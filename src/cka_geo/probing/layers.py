"""probe_layers: one capture pass per batch, every sublayer's ridge statistics at once."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from cka_geo.errors import DataError, FeatureError, UsageError
from cka_geo.features import KINDS, capture, forward_batch, resolve_sublayers, sublayer_map
from cka_geo.isolation import observing
from cka_geo.probing.result import LayerProbe, ProbeResult
from cka_geo.probing.ridge import ALPHAS, RidgeFit, RidgeStats, fit_ridge, select_alpha
from cka_geo.sublayers import parse

TASKS: tuple[str, ...] = ("classification", "regression")


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


def _read_batch(
    model: nn.Module, cap: Any, item: Any, where: str, task: str, time_mode: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor], int, torch.Tensor]:
    """One (images, targets) batch through the capture: images, features, rows, targets."""
    x, y_raw = _unpack(item, where)
    feats = forward_batch(model, x, cap, time_mode=time_mode).features
    _check_finite(feats, where)
    rows = next(iter(feats.values())).shape[0]
    frames = x.ndim == 5 and time_mode == "frames"
    batch = x.shape[0] * (x.shape[1] if frames else 1)
    if frames:
        y_raw = torch.as_tensor(y_raw).repeat_interleave(x.shape[1], dim=0)
    return x, feats, rows, _targets(y_raw, task, rows, batch, where)


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
    with observing(model):
        stats: dict[str, RidgeStats] = {}
        with capture(model, names, pooling=pooling) as cap:
            for bi, item in enumerate(train_batches):
                where = f"train batch {bi}"
                x, feats, rows, y = _read_batch(model, cap, item, where, task, time_mode)
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
                x, feats, rows, y = _read_batch(model, cap, item, where, task, time_mode)
                y = y.cpu()
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
