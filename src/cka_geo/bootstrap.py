"""Confidence intervals for minibatch CKA by a bootstrap over batches.

Minibatch CKA is a ratio of sums over batches (Nguyen et al. 2021, eq. 3), so a bootstrap
replicate only reweights the per-batch HSIC terms already kept by the accumulator:
resample the K batches with replacement, sum their terms, take the ratio. No forward pass
is repeated. The interval is the percentile interval of the replicates.

Caveat: with few batches (K < 10, say) the bootstrap distribution is coarse and the
interval is too narrow; use more, smaller batches when intervals matter.
"""

from __future__ import annotations

import numpy as np

from cka_geo.errors import UsageError


def bootstrap_ratio(
    cross: np.ndarray,
    self_a: np.ndarray,
    self_b: np.ndarray,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile intervals of ``Σ cross / sqrt(Σ self_a · Σ self_b)`` over resampled batches.

    Args:
        cross: (batches, m) per-batch cross terms of m entries (e.g. a matrix diagonal).
        self_a: (batches, m) per-batch self terms of the rows' layers.
        self_b: (batches, m) per-batch self terms of the columns' layers.
        resamples: Bootstrap replicates.
        confidence: Two-sided level, in (0, 1).
        seed: Seed of the resampling.

    Returns:
        ``(lo, hi)``, each (m,); NaN where fewer than 2 batches exist or a replicate's
        denominator is 0.
    """
    if not 0 < confidence < 1:
        raise UsageError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise UsageError(f"bootstrap resamples must be positive, got {resamples}")
    k, m = cross.shape
    if k < 2:
        nan = np.full(m, np.nan)
        return nan, nan.copy()
    rng = np.random.default_rng(seed)
    # (resamples, batches) multiplicities of each batch in each replicate
    weights = rng.multinomial(k, np.full(k, 1.0 / k), size=resamples).astype(np.float64)
    num = weights @ cross
    den = np.sqrt((weights @ self_a) * (weights @ self_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = np.where(den > 0, num / den, np.nan)
    alpha = (1 - confidence) / 2
    lo = np.quantile(reps, alpha, axis=0)
    hi = np.quantile(reps, 1 - alpha, axis=0)
    return lo, hi
