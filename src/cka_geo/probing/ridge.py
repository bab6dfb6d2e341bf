"""Ridge probes in closed form from float64 sufficient statistics, and the CV choice of λ."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cka_geo.errors import FeatureError

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
