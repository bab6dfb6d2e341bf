"""The functional core: gram matrices, centering, HSIC estimators and CKA.

Shapes are written in words: ``x`` is (samples n, features p), a gram is (n, n). Every
function works on CPU and CUDA tensors alike and returns tensors on the input's device.

Sources (formulas in ``shared/design.md``):

* Linear and RBF CKA, biased HSIC ``tr(K H L H) / (n-1)^2``, feature-space linear CKA:
  Kornblith, Norouzi, Lee & Hinton, "Similarity of Neural Network Representations
  Revisited", ICML 2019.
* Unbiased HSIC_1: Song, Smola, Gretton, Bedo & Borgwardt, "Feature Selection via Dependence
  Maximization", JMLR 2012, eq. (5).
* U-centering, with ``HSIC_1 = <U(K), U(L)>_F / (n (n-3))``: Székely & Rizzo, "Partial
  distance correlation with methods for dissimilarities", Annals of Statistics 2014.

Numerics: features are mean-centred before any gram (it changes no CKA value, since the
linear gram then equals H K H and RBF distances are translation invariant, but it removes the
catastrophic cancellation of float32 grams for features with a large offset). Centering and
HSIC sums run in float64. There is no clamping and no epsilon: a CKA of a constant
representation is NaN, not a made-up number.
"""

from __future__ import annotations

from typing import Literal

import torch

from cka_geo.errors import FeatureError, UsageError

Kernel = Literal["linear", "rbf"]
Estimator = Literal["unbiased", "biased"]

KERNELS = ("linear", "rbf")
ESTIMATORS = ("unbiased", "biased")
DEFAULT_RBF_FRAC = 0.4


def _check_features(x: torch.Tensor, name: str = "x") -> None:
    if x.ndim != 2:
        raise FeatureError(f"{name} must have shape (samples, features), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise FeatureError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_kernel(kernel: str, estimator: str) -> None:
    """Raise UsageError for an unknown kernel or estimator name."""
    if kernel not in KERNELS:
        raise UsageError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if estimator not in ESTIMATORS:
        raise UsageError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def min_samples(estimator: str) -> int:
    """Fewest samples an estimator is defined for (unbiased: n >= 4; biased: n >= 2)."""
    return 4 if estimator == "unbiased" else 2


def center_features(x: torch.Tensor) -> torch.Tensor:
    """Subtract the column means: (n, p) -> (n, p)."""
    return x - x.mean(dim=-2, keepdim=True)


def gram_linear(x: torch.Tensor) -> torch.Tensor:
    """Linear gram ``K = X_c X_cᵀ`` of the mean-centred features.

    Args:
        x: Features (n, p), or a stack (L, n, p).

    Returns:
        (n, n) or (L, n, n), in x's dtype. Centering first leaves every CKA value unchanged
        (H X Xᵀ H = X_c X_cᵀ) and keeps float32 accurate for offset features.
    """
    xc = center_features(x)
    return xc @ xc.transpose(-1, -2)


def _lower_upper_median(values: torch.Tensor) -> torch.Tensor:
    """Median of the last dimension, averaging the two middle values for an even count."""
    m = values.shape[-1]
    lo = torch.kthvalue(values, (m + 1) // 2, dim=-1).values
    if m % 2:
        return lo
    hi = torch.kthvalue(values, m // 2 + 1, dim=-1).values
    return (lo + hi) / 2


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between rows: (…, n, p) -> (…, n, n), zero diagonal."""
    xc = center_features(x)
    sq = (xc * xc).sum(-1)
    d = sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * (xc @ xc.transpose(-1, -2))
    d = d.clamp_min_(0)
    d.diagonal(dim1=-2, dim2=-1).zero_()
    return d


def rbf_sigma(sq_dist: torch.Tensor, frac: float = DEFAULT_RBF_FRAC) -> torch.Tensor:
    """Bandwidth ``sigma = frac * sqrt(median of squared pairwise distances)``.

    The median is taken over the n (n-1) / 2 distinct pairs i < j (the diagonal's zeros are
    excluded; Kornblith et al.'s notebook includes them, which lowers the median for small
    n), averaging the two middle values when their count is even. If that median is 0 (more
    than half the pairs coincide) the mean over pairs is used instead; if it is 0 too the
    representation is constant and sigma is NaN (its gram is then all ones).

    Args:
        sq_dist: Squared distances (…, n, n) from :func:`squared_distances`.
        frac: Fraction of the median distance (0.2, 0.4, 0.8 are common).

    Returns:
        sigma, shape (…).
    """
    n = sq_dist.shape[-1]
    iu = torch.triu_indices(n, n, offset=1, device=sq_dist.device)
    pairs = sq_dist[..., iu[0], iu[1]].to(torch.float64)
    med = _lower_upper_median(pairs)
    med = torch.where(med > 0, med, pairs.mean(-1))
    med = torch.where(med > 0, med, torch.full_like(med, float("nan")))
    return frac * med.sqrt()


def gram_rbf(
    x: torch.Tensor, frac: float = DEFAULT_RBF_FRAC, sigma: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RBF gram ``K_ij = exp(-‖x_i − x_j‖² / (2 σ²))``.

    Args:
        x: Features (n, p), or a stack (L, n, p).
        frac: Bandwidth fraction for the median rule of :func:`rbf_sigma` (used when
            ``sigma`` is None).
        sigma: A fixed bandwidth instead of the median rule.

    Returns:
        ``(gram, sigma)``: gram (…, n, n) in x's dtype, and the sigma used (…) in float64,
        to be recorded with the result. A constant representation gives an all-ones gram
        and sigma NaN.
    """
    if not frac > 0:
        raise UsageError(f"RBF bandwidth fraction must be positive, got {frac}")
    d = squared_distances(x)
    if sigma is None:
        s = rbf_sigma(d, frac)
    else:
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(d.shape[:-2])
    denom = (2 * s * s).to(d.dtype)
    safe = torch.where(torch.isnan(denom), torch.ones_like(denom), denom)
    k = torch.exp(-d / safe[..., None, None])
    return k, s


def center_gram(k: torch.Tensor) -> torch.Tensor:
    """Double centering ``H K H`` with ``H = I − 11ᵀ/n`` (for the biased estimator)."""
    k = k.to(torch.float64)
    row = k.mean(dim=-1, keepdim=True)
    col = k.mean(dim=-2, keepdim=True)
    return k - row - col + k.mean(dim=(-2, -1), keepdim=True)


def u_center_gram(k: torch.Tensor) -> torch.Tensor:
    """U-centering (Székely & Rizzo 2014, sec. 4.1) of a symmetric gram, in float64.

    With K̃ the gram with its diagonal zeroed, for i != j::

        U_ij = K̃_ij − Σ_l K̃_il/(n−2) − Σ_l K̃_lj/(n−2) + Σ_kl K̃_kl/((n−1)(n−2)),

    and U_ii = 0. Then ``<U(K), U(L)>_F / (n (n−3))`` is Song et al.'s unbiased HSIC_1.

    Args:
        k: Symmetric gram (…, n, n) with n >= 4.

    Returns:
        (…, n, n) float64.
    """
    n = k.shape[-1]
    if n < 4:
        raise FeatureError(f"U-centering needs at least 4 samples, got {n}")
    k = k.to(torch.float64).clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    # Column sums equal row sums (symmetric gram); the total enters once per side.
    means = k.sum(dim=-2) / (n - 2)
    means = means - means.sum(dim=-1, keepdim=True) / (2 * (n - 1))
    k = k - means.unsqueeze(-1) - means.unsqueeze(-2)
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


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
    x: torch.Tensor, kernel: Kernel = "linear", frac: float = DEFAULT_RBF_FRAC
) -> torch.Tensor:
    """The gram of features (n, p) under ``kernel`` (RBF bandwidth by the median rule)."""
    _check_features(x)
    check_kernel(kernel, "unbiased")
    return gram_linear(x) if kernel == "linear" else gram_rbf(x, frac)[0]


def cka(
    x: torch.Tensor,
    y: torch.Tensor,
    kernel: Kernel = "linear",
    estimator: Estimator = "unbiased",
    frac: float = DEFAULT_RBF_FRAC,
) -> torch.Tensor:
    """Full-batch CKA between two representations of the same n samples.

    Args:
        x: Features (n, p1).
        y: Features (n, p2), rows matching x's.
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"unbiased"`` (HSIC_1, debiased CKA) or ``"biased"``.
        frac: RBF bandwidth fraction (sigma = frac * median pairwise distance).

    Returns:
        A float64 scalar tensor.

    Example:
        >>> x = torch.randn(50, 8, dtype=torch.float64)
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
        >>> round(cka(x, 3 * x @ q + 1).item(), 12)
        1.0
    """
    _check_features(x, "x")
    _check_features(y, "y")
    if x.shape[0] != y.shape[0]:
        raise FeatureError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    check_kernel(kernel, estimator)
    need = min_samples(estimator)
    if x.shape[0] < need:
        raise FeatureError(f"the {estimator} estimator needs at least {need} samples, got {x.shape[0]}")
    return cka_from_grams(gram(x, kernel, frac), gram(y, kernel, frac), estimator)


def linear_cka_feature_space(x: torch.Tensor, y: torch.Tensor, estimator: Estimator = "biased") -> torch.Tensor:
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
    _check_features(x, "x")
    _check_features(y, "y")
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
