"""An independent float64 NumPy reference for the CKA maths, written from the formulas.

Nothing here imports cka_geo. Grams are formed literally (K = X Xᵀ, pairwise differences
for the RBF), centering uses the explicit matrix H = I - 11ᵀ/n, and the unbiased HSIC is
Song et al. (2012), eq. 5, term by term, or the U-statistic summed over 4-tuples.
"""

from __future__ import annotations

import itertools

import numpy as np


def gram_linear(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def sq_dists(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    diff = x[:, None, :] - x[None, :, :]
    return (diff**2).sum(-1)


def rbf_sigma(x: np.ndarray, frac: float) -> float:
    d = sq_dists(x)
    iu = np.triu_indices(d.shape[0], k=1)
    return frac * float(np.sqrt(np.median(d[iu])))


def gram_rbf(x: np.ndarray, frac: float) -> np.ndarray:
    s = rbf_sigma(x, frac)
    return np.exp(-sq_dists(x) / (2 * s * s))


def gram(x: np.ndarray, kernel: str, frac: float = 0.4) -> np.ndarray:
    return gram_linear(x) if kernel == "linear" else gram_rbf(x, frac)


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    kt = k - np.diag(np.diag(k))
    lt = l - np.diag(np.diag(l))
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float(term1 + term2 - term3) / (n * (n - 3))


def hsic_ustatistic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al.'s HSIC_1 as the U-statistic over ordered 4-tuples of distinct indices."""
    n = k.shape[0]
    total = 0.0
    count = 0
    for i, j, q, r in itertools.permutations(range(n), 4):
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
        count += 1
    return total / count


def hsic(k: np.ndarray, l: np.ndarray, estimator: str) -> float:
    return hsic_unbiased(k, l) if estimator == "unbiased" else hsic_biased(k, l)


def cka(x: np.ndarray, y: np.ndarray, kernel: str = "linear", estimator: str = "unbiased", frac: float = 0.4) -> float:
    k, l = gram(x, kernel, frac), gram(y, kernel, frac)
    return hsic(k, l, estimator) / np.sqrt(hsic(k, k, estimator) * hsic(l, l, estimator))


def minibatch_cka_matrix(
    batches_a: list[list[np.ndarray]],
    batches_b: list[list[np.ndarray]],
    kernel: str = "linear",
    estimator: str = "unbiased",
    frac: float = 0.4,
) -> np.ndarray:
    """Nguyen et al. (2021), eq. 3, with a loop over every layer pair and batch."""
    la, lb = len(batches_a[0]), len(batches_b[0])
    cross = np.zeros((la, lb))
    sa, sb = np.zeros(la), np.zeros(lb)
    for fa, fb in zip(batches_a, batches_b, strict=True):
        ga = [gram(x, kernel, frac) for x in fa]
        gb = [gram(y, kernel, frac) for y in fb]
        for i in range(la):
            sa[i] += hsic(ga[i], ga[i], estimator)
            for j in range(lb):
                cross[i, j] += hsic(ga[i], gb[j], estimator)
        for j in range(lb):
            sb[j] += hsic(gb[j], gb[j], estimator)
    return cross / np.sqrt(np.outer(sa, sb))
