"""Coverage of the bootstrap intervals of minibatch CKA: percentile (cka-geo) vs BCa (scipy).

Issue 12 asks whether ``scipy.stats.bootstrap(method="BCa")`` on the per-batch HSIC terms
beats cka-geo's percentile bootstrap in coverage. This script measures it where the truth
is known.

Model: jointly Gaussian features, x = z W1 + s e1 and y = z W2 + s e2 with z ~ N(0, I_r),
e1, e2 ~ N(0, I). For linear kernels the population HSIC is the squared Frobenius norm of
the cross-covariance (Gretton et al. 2005), so the population CKA is

    CKA = ||Σxy||²_F / (||Σxx||_F ||Σyy||_F),   Σxy = W1ᵀ W2,  Σxx = W1ᵀ W1 + s² I, ...

Each replicate draws K batches of b samples, computes the unbiased HSIC terms of every
batch (Song et al. 2012, eq. 5; written here in float64 numpy, independent of cka-geo's
engine), and forms the minibatch CKA (Nguyen et al. 2021, eq. 3) and two 95 % intervals
over batches: cka-geo's ``bootstrap_ratio`` (percentile), scipy's BCa on the same
paired per-batch terms, and cka-geo's ``jackknife_ratio`` (delete-one-batch jackknife
standard error with a Student t quantile on K - 1 degrees of freedom; the default). Coverage = share of replicates whose interval holds the population
CKA. The minibatch CKA is consistent but not unbiased (a ratio), so neither interval is
exact at small K.

Usage: python benchmarks/bench_intervals.py [--reps 400] [--batch 32] [--dims 16]
Needs scipy (not a cka-geo dependency): pip install scipy.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cka_geo.bootstrap import bootstrap_ratio, jackknife_ratio


def unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC of two (n, n) grams, n >= 4, float64."""
    n = k.shape[0]
    k = k.copy()
    l = l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one_k = k.sum(axis=0)
    one_l = l.sum(axis=0)
    term = np.sum(k * l) + one_k.sum() * one_l.sum() / ((n - 1) * (n - 2)) - 2 * one_k @ one_l / (n - 2)
    return float(term / (n * (n - 3)))


def population(w1: np.ndarray, w2: np.ndarray, s: float) -> float:
    sxy = w1.T @ w2
    sxx = w1.T @ w1 + s * s * np.eye(w1.shape[1])
    syy = w2.T @ w2 + s * s * np.eye(w2.shape[1])
    return float(np.sum(sxy**2) / (np.linalg.norm(sxx) * np.linalg.norm(syy)))


def terms(rng: np.random.Generator, w1: np.ndarray, w2: np.ndarray, s: float, k: int, b: int) -> np.ndarray:
    """(k, 3) per-batch (cross, self_x, self_y) unbiased HSIC terms."""
    out = np.empty((k, 3))
    r = w1.shape[0]
    for i in range(k):
        z = rng.standard_normal((b, r))
        x = z @ w1 + s * rng.standard_normal((b, w1.shape[1]))
        y = z @ w2 + s * rng.standard_normal((b, w2.shape[1]))
        kx, ly = x @ x.T, y @ y.T
        out[i] = unbiased_hsic(kx, ly), unbiased_hsic(kx, kx), unbiased_hsic(ly, ly)
    return out


def ratio(c: np.ndarray, a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    """Minibatch CKA of resampled per-batch terms (the statistic handed to scipy)."""
    return np.sum(c, axis=axis) / np.sqrt(np.sum(a, axis=axis) * np.sum(b, axis=axis))


def main() -> None:
    from scipy import stats

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--dims", type=int, default=16)
    p.add_argument("--resamples", type=int, default=1000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    d, r = args.dims, 4
    w1 = rng.standard_normal((r, d))
    print(f"{args.reps} replicates, batches of {args.batch}, {d}-dim features, 95 % intervals")
    print(f"{'K':>4} {'CKA':>6} {'noise':>5} {'percentile':>11} {'BCa':>6} {'jack-t':>7} {'width pct':>10} {'width BCa':>10} {'width jack-t':>13}")
    # (noise s, weight of w1 in w2, weight of a fresh direction in w2): CKA from ~0.13 to
    # ~0.99, the last the regime of a pretrained vs fine-tuned sublayer.
    cases = ((1.0, 0.5, 1.0), (2.0, 0.2, 1.0), (4.0, 0.0, 1.0), (0.5, 1.0, 0.15), (0.2, 1.0, 0.05))
    for noise, mix, fresh in cases:
        w2 = mix * w1 + fresh * rng.standard_normal((r, d))
        truth = population(w1, w2, noise)
        for k in (6, 10, 16, 32):
            hit_p = hit_b = hit_j = 0
            wid_p = wid_b = wid_j = 0.0
            t0 = time.perf_counter()
            for _ in range(args.reps):
                t = terms(rng, w1, w2, noise, k, args.batch)
                lo, hi = bootstrap_ratio(
                    t[:, :1], t[:, 1:2], t[:, 2:], resamples=args.resamples, seed=int(rng.integers(2**31))
                )
                hit_p += int(lo[0] <= truth <= hi[0])
                wid_p += float(hi[0] - lo[0])
                res = stats.bootstrap(
                    (t[:, 0], t[:, 1], t[:, 2]),
                    ratio,
                    paired=True,
                    vectorized=True,
                    n_resamples=args.resamples,
                    method="BCa",
                    random_state=int(rng.integers(2**31)),
                )
                ci = res.confidence_interval
                hit_b += int(ci.low <= truth <= ci.high)
                wid_b += float(ci.high - ci.low)
                jlo, jhi = jackknife_ratio(t[:, :1], t[:, 1:2], t[:, 2:])
                hit_j += int(jlo[0] <= truth <= jhi[0])
                wid_j += float(jhi[0] - jlo[0])
            n = args.reps
            print(
                f"{k:>4} {truth:6.3f} {noise:5.1f} {hit_p / n:11.3f} {hit_b / n:6.3f} {hit_j / n:7.3f} "
                f"{wid_p / n:10.4f} {wid_b / n:10.4f} {wid_j / n:13.4f}   ({time.perf_counter() - t0:.0f} s)"
            )


if __name__ == "__main__":
    main()
