"""HSIC estimators and full-batch CKA.

Sources (formulas in ``shared/design.md``):

* Linear and RBF CKA, biased HSIC ``tr(K H L H) / (n-1)^2``, feature-space linear CKA:
  Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations
  Revisited", ICML 2019.
* Unbiased HSIC_1: Song, Smola, Gretton, Bedo & Borgwardt, "Feature Selection via Dependence
  Maximization", JMLR 2012, eq. (5).
* ``HSIC_1 = <U(K), U(L)>_F / (n (n-3))`` with U the U-centering of Székely & Rizzo (2014).

HSIC sums run in float64. There is no clamping and no epsilon: an undefined CKA (a constant
representation, or one at the round-off level of the arithmetic) is NaN with a warning, not
a made-up number (thresholds in :mod:`cka_geo.functional.precision`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from cka_geo.errors import FeatureError, UsageError
from cka_geo.functional.kernels import (
    DEFAULT_RBF_FRAC,
    Estimator,
    Kernel,
    center_features,
    center_gram,
    check_kernel,
    gram_linear,
    gram_rbf,
    min_samples,
    u_center_gram,
)
from cka_geo.functional.precision import is_constant, noise_tol, pow2_scale


def hsic(k: torch.Tensor, l: torch.Tensor, estimator: Estimator = "unbiased") -> torch.Tensor:
    """HSIC between two grams of the same n samples.

    Args:
        k: Gram (n, n).
        l: Gram (n, n).
        estimator: ``"biased"``: ``tr(K H L H) / (n−1)²`` (Gretton et al. 2005);
            ``"unbiased"``: HSIC_1 of Song et al. (2012), needs n >= 4.

    Returns:
        A float64 scalar tensor.
    """
    check_kernel("linear", estimator)
    n = k.shape[-1]
    if estimator == "unbiased":
        return (u_center_gram(k) * u_center_gram(l)).sum((-2, -1)) / (n * (n - 3))
    if n < 2:
        raise FeatureError(f"biased HSIC needs at least 2 samples, got {n}")
    return (center_gram(k) * center_gram(l)).sum((-2, -1)) / (n - 1) ** 2


def cka_from_grams(k: torch.Tensor, l: torch.Tensor, estimator: Estimator = "unbiased") -> torch.Tensor:
    """``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``; NaN when either self term is 0."""
    kk, ll, kl = hsic(k, k, estimator), hsic(l, l, estimator), hsic(k, l, estimator)
    return kl / (kk * ll).sqrt()


def gram(
    x: torch.Tensor | np.ndarray, kernel: Kernel = "linear", frac: float = DEFAULT_RBF_FRAC
) -> torch.Tensor:
    """The gram of features (n, p) under ``kernel`` (RBF bandwidth by the median rule)."""
    x = as_features(x)
    check_kernel(kernel, "unbiased")
    return gram_linear(x) if kernel == "linear" else gram_rbf(x, frac)[0]


def cka(
    x: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    kernel: Kernel = "linear",
    estimator: Estimator = "unbiased",
    frac: float = DEFAULT_RBF_FRAC,
) -> torch.Tensor:
    """Full-batch CKA between two representations of the same n samples.

    Computed in float64 whatever the input dtype (float16 grams would overflow), after
    scaling each representation by a power of two (exact; CKA is scale invariant). It is
    differentiable in ``x`` and ``y``. Undefined cases give NaN with a warning, never a
    number: a representation that is constant within round-off
    (:func:`~cka_geo.functional.precision.is_constant`) or whose self-HSIC is at the
    round-off level of its gram. Identical inputs give exactly 1.

    Args:
        x: Features (n, p1): a floating tensor or numpy array.
        y: Features (n, p2), rows matching x's.
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"unbiased"`` (HSIC_1, debiased CKA) or ``"biased"``.
        frac: RBF bandwidth fraction (sigma = frac * median pairwise distance).

    Returns:
        A float64 scalar tensor.

    Raises:
        FeatureError: Not (samples, features), not floating, different sample counts,
            fewer samples than the estimator needs, or NaN/Inf values.

    Example:
        >>> x = torch.randn(50, 8, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
        >>> round(cka(x, 3 * x @ q + 1).item(), 12)
        1.0
    """
    x, y = as_features(x, "x"), as_features(y, "y")
    if x.shape[0] != y.shape[0]:
        raise FeatureError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    check_kernel(kernel, estimator)
    need = min_samples(estimator)
    if x.shape[0] < need:
        raise FeatureError(f"the {estimator} estimator needs at least {need} samples, got {x.shape[0]}")
    if kernel == "rbf" and not frac > 0:
        raise UsageError(f"RBF bandwidth fraction must be positive, got {frac}")
    same = x is y or (x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y))
    xs, x_const = _scaled(x, "x")
    ys, y_const = (xs, x_const) if same else _scaled(y, "y")
    if x_const or y_const:
        which = " and ".join(n for n, c in (("x", x_const), ("y", y_const)) if c)
        return _undefined(f"{which} is constant within round-off")
    k = gram(xs, kernel, frac)
    l = k if same else gram(ys, kernel, frac)
    kk = hsic(k, k, estimator)
    ll = kk if same else hsic(l, l, estimator)
    noisy = [n for n, g, s in (("x", k, kk), ("y", l, ll)) if _at_round_off(g, s, estimator)]
    if noisy:
        return _undefined(f"the self-HSIC of {' and '.join(noisy)} is at the round-off level of its gram")
    kl = kk if same else hsic(k, l, estimator)
    return kl / (kk * ll).sqrt()


def as_features(x: torch.Tensor | np.ndarray, name: str = "x") -> torch.Tensor:
    """A (samples, features) floating tensor from a tensor or a numpy array.

    Raises:
        FeatureError: Another type, not two-dimensional, or not floating point.
    """
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise FeatureError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise FeatureError(f"{name} must have shape (samples, features), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise FeatureError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _scaled(x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """x in float64 scaled by a power of two, and whether it is constant within round-off."""
    if not bool(torch.isfinite(x).all()):
        raise FeatureError(f"{name} has NaN or Inf values")
    x64 = x.to(torch.float64)
    x64 = x64 * pow2_scale(x64.detach().abs().amax())
    centred_sq = (x64 - x64.mean(0)).detach().square().sum()
    return x64, bool(is_constant(centred_sq, x64.detach().square().sum(), x.dtype))


def _at_round_off(k: torch.Tensor, self_term: torch.Tensor, estimator: str) -> bool:
    n = k.shape[-1]
    k = k.detach()
    if estimator == "unbiased":
        k = k.clone()
        k.diagonal().zero_()
        scaled = n * (n - 3) * self_term.detach()
    else:
        scaled = (n - 1) ** 2 * self_term.detach()
    return bool(scaled <= noise_tol(torch.float64) * k.square().sum())


def _undefined(why: str) -> torch.Tensor:
    warnings.warn(f"CKA undefined (NaN): {why}", RuntimeWarning, stacklevel=3)
    return torch.tensor(float("nan"), dtype=torch.float64)


def linear_cka_feature_space(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, estimator: Estimator = "biased"
) -> torch.Tensor:
    """Linear CKA from (p × p) cross-covariances, never forming an n × n gram.

    Biased: ``‖Y_cᵀ X_c‖²_F / (‖X_cᵀ X_c‖_F ‖Y_cᵀ Y_c‖_F)`` (Kornblith et al. 2019, eq. 5).
    Unbiased: Song et al.'s HSIC_1 written in feature space. With centred features (so that
    K̃1 = −a, a_i = ‖x_i‖²) it reduces to, up to the common factor 1/(n(n−3)),
    ``‖Y_cᵀX_c‖²_F − n/(n−2) Σ_i a_i b_i + (Σa)(Σb) / ((n−1)(n−2))``.
    An independent formulation of the gram route, used to check it.

    Args:
        x: Features (n, p1).
        y: Features (n, p2).
        estimator: ``"biased"`` or ``"unbiased"``.

    Returns:
        A float64 scalar tensor.
    """
    x, y = as_features(x, "x"), as_features(y, "y")
    check_kernel("linear", estimator)
    xc = center_features(x.to(torch.float64))
    yc = center_features(y.to(torch.float64))
    n = xc.shape[0]

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cross = (v.T @ u).square().sum()
        if estimator == "biased":
            return cross
        a, b = u.square().sum(1), v.square().sum(1)
        return cross - n / (n - 2) * (a @ b) + a.sum() * b.sum() / ((n - 1) * (n - 2))

    return dot(xc, yc) / (dot(xc, xc) * dot(yc, yc)).sqrt()


__all__ = ["as_features", "cka", "cka_from_grams", "gram", "hsic", "linear_cka_feature_space"]
