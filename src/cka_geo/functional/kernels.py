"""Gram matrices and their centerings (the kernels of the functional core).

Shapes are written in words: ``x`` is (samples n, features p), a gram is (n, n). Every
function works on CPU and CUDA tensors alike and returns tensors on the input's device.

Sources: linear and RBF grams and the median bandwidth rule, Kornblith, Norouzi, Lee &
Hinton, "Similarity of Neural Network Representations Revisited", ICML 2019; U-centering,
Székely & Rizzo, "Partial distance correlation with methods for dissimilarities", Annals of
Statistics 2014.

Features are mean-centred before any gram: it changes no CKA value (the linear gram then
equals H K H; RBF distances are translation invariant) but removes the catastrophic
cancellation of float32 grams for features with a large offset.
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


def check_kernel(kernel: str, estimator: str) -> None:
    """Raise UsageError for an unknown kernel or estimator name."""
    if kernel not in KERNELS:
        raise UsageError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if estimator not in ESTIMATORS:
        raise UsageError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


def min_samples(estimator: str) -> int:
    """Fewest samples an estimator is meaningful for: unbiased n >= 4, biased n >= 3.

    HSIC_1 is undefined below 4 rows (its normaliser n (n-3)). The biased estimator is
    defined at n = 2 but degenerate there: two centred samples span one direction, so every
    pair of non-constant representations has CKA exactly 1.
    """
    return 4 if estimator == "unbiased" else 3


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


def squared_distances(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances between rows: (…, n, p) -> (…, n, n), zero diagonal.

    Args:
        x: Features (n, p), or a stack (L, n, p) (or more leading dimensions).
        out: Where to write them ((n, n) or (L, n, n), x's dtype), or None for a new tensor.
    """
    xc = center_features(x)
    sq = (xc * xc).sum(-1)
    xt = xc.transpose(-1, -2)
    # ‖x_i‖² + ‖x_j‖² (symmetric, one pass), then − 2 x_i·x_j added by the matmul itself.
    d = torch.add(sq.unsqueeze(-1), sq.unsqueeze(-2), out=out)
    if xc.ndim == 3:
        d.baddbmm_(xc, xt, alpha=-2)
    elif xc.ndim == 2:
        d.addmm_(xc, xt, alpha=-2)
    else:
        d -= 2 * (xc @ xt)
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
        sq_dist: Squared distances (…, n, n) from :func:`squared_distances`: symmetric,
            non-negative, finite, zero diagonal.
        frac: Fraction of the median distance (0.2, 0.4, 0.8 are common).

    Returns:
        sigma, shape (…).
    """
    # The median over the n(n-1)/2 pairs i < j from one selection, multi-threaded over the
    # layers, in the distances' own dtype (order statistics are exact in any dtype): for an even
    # count the upper middle value is the lower one when it repeats, else the least value above
    # it (two elementwise passes instead of a second selection). The average is float64.
    n = sq_dist.shape[-1]
    iu = torch.triu_indices(n, n, offset=1, device=sq_dist.device)
    pairs = sq_dist[..., iu[0], iu[1]]
    m = pairs.shape[-1]
    lo = torch.kthvalue(pairs, (m + 1) // 2, dim=-1).values
    med = lo.to(torch.float64)
    # The fallback mean, only where a median is 0 (one host sync), before the pairs are overwritten.
    mean = pairs.mean(-1, dtype=torch.float64) if not bool((lo > 0).all()) else None
    if m % 2 == 0:
        below = pairs <= lo[..., None]
        ties = torch.count_nonzero(below, dim=-1)
        above = pairs.masked_fill_(below, float("inf")).amin(-1)  # pairs is a copy (the gather)
        hi = torch.where(ties >= m // 2 + 1, lo, above)
        med = (med + hi.to(torch.float64)) / 2
    if mean is not None:
        med = torch.where(med > 0, med, mean)
    med = torch.where(med > 0, med, torch.full_like(med, float("nan")))
    return frac * med.sqrt()


def gram_rbf(
    x: torch.Tensor,
    frac: float = DEFAULT_RBF_FRAC,
    sigma: float | torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RBF gram ``K_ij = exp(-‖x_i − x_j‖² / (2 σ²))``.

    Args:
        x: Features (n, p), or a stack (L, n, p).
        frac: Bandwidth fraction for the median rule of :func:`rbf_sigma` (used when
            ``sigma`` is None).
        sigma: A fixed bandwidth instead of the median rule.
        out: Where to write the gram (…, n, n) (x's dtype), or None for a new tensor.

    Returns:
        ``(gram, sigma)``: gram (…, n, n) in x's dtype, and the sigma used (…) in float64,
        to be recorded with the result. A constant representation gives an all-ones gram
        and sigma NaN.
    """
    if not frac > 0:
        raise UsageError(f"RBF bandwidth fraction must be positive, got {frac}")
    d = squared_distances(x, out)
    if sigma is None:
        s = rbf_sigma(d, frac)
    else:
        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(d.shape[:-2])
    denom = (2 * s * s).to(d.dtype)
    safe = torch.where(torch.isnan(denom), torch.ones_like(denom), denom)
    k = d.div_(-safe[..., None, None]).exp_()  # in place: the distances are not needed after
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


__all__ = [
    "DEFAULT_RBF_FRAC",
    "ESTIMATORS",
    "KERNELS",
    "Estimator",
    "Kernel",
    "center_features",
    "center_gram",
    "check_kernel",
    "gram_linear",
    "gram_rbf",
    "min_samples",
    "rbf_sigma",
    "squared_distances",
    "u_center_gram",
]
