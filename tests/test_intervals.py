"""Intervals over batches (cka_geo.bootstrap): the t quantile, the jackknife, coverage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cka_geo.bootstrap import bootstrap_ratio, jackknife_ratio, t_quantile
from cka_geo.errors import UsageError

# Two-sided 95 % and 99 % Student-t quantiles from published tables (e.g. NIST/SEMATECH
# e-Handbook 1.3.6.7.2), to the digits printed there.
TABLE = {
    (0.95, 1): 12.706,
    (0.95, 2): 4.303,
    (0.95, 5): 2.571,
    (0.95, 10): 2.228,
    (0.95, 30): 2.042,
    (0.95, 100): 1.984,
    (0.99, 1): 63.657,
    (0.99, 4): 4.604,
    (0.99, 15): 2.947,
}


@pytest.mark.parametrize(("key", "value"), TABLE.items())
def test_t_quantile_matches_the_printed_table(key: tuple[float, int], value: float) -> None:
    assert t_quantile(*key) == pytest.approx(value, abs=5e-4)


def test_t_quantile_closed_forms() -> None:
    # df = 1 is Cauchy: t = tan(pi c / 2); df = 2: t = 2c / sqrt(2 (1 - c^2)).
    for c in (0.5, 0.9, 0.95, 0.999):
        assert t_quantile(c, 1) == pytest.approx(np.tan(np.pi * c / 2), rel=1e-12)
        assert t_quantile(c, 2) == pytest.approx(2 * c / np.sqrt(2 * (1 - c * c)), rel=1e-12)
    # large df tends to the normal quantile (1.959963984540054 for 95 %)
    assert t_quantile(0.95, 100_000) == pytest.approx(1.959963984540054, abs=1e-4)


def test_t_quantile_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (*range(1, 60), 99, 250, 1000):
        for c in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999):
            assert t_quantile(c, df) == pytest.approx(stats.t.ppf(0.5 + c / 2, df), rel=1e-10)


def test_t_quantile_refuses_bad_arguments() -> None:
    with pytest.raises(UsageError, match="confidence"):
        t_quantile(1.0, 3)
    with pytest.raises(UsageError, match="degrees of freedom"):
        t_quantile(0.95, 0)


def _loop_jackknife(c: np.ndarray, a: np.ndarray, b: np.ndarray, conf: float) -> tuple[np.ndarray, np.ndarray]:
    """Written from the textbook definition, one left-out batch at a time."""
    k = len(c)
    est = c.sum(0) / np.sqrt(a.sum(0) * b.sum(0))
    thetas = []
    for i in range(k):
        keep = [j for j in range(k) if j != i]
        thetas.append(c[keep].sum(0) / np.sqrt(a[keep].sum(0) * b[keep].sum(0)))
    th = np.array(thetas)
    se = np.sqrt((k - 1) / k * ((th - th.mean(0)) ** 2).sum(0))
    tq = t_quantile(conf, k - 1)
    return est - tq * se, est + tq * se


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 40), m=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), conf=st.sampled_from([0.8, 0.95]))
def test_jackknife_equals_the_textbook_loop(k: int, m: int, seed: int, conf: float) -> None:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, (k, m))
    b = rng.uniform(0.5, 2.0, (k, m))
    c = rng.uniform(-0.2, 1.0, (k, m)) * np.sqrt(a * b)
    lo, hi = jackknife_ratio(c, a, b, confidence=conf)
    rlo, rhi = _loop_jackknife(c, a, b, conf)
    np.testing.assert_allclose(lo, rlo, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(hi, rhi, rtol=1e-10, atol=1e-12)
    est = c.sum(0) / np.sqrt(a.sum(0) * b.sum(0))
    assert np.all(lo <= est + 1e-15) and np.all(est <= hi + 1e-15)


def test_jackknife_undefined_cases_are_nan() -> None:
    one = np.ones((1, 3))
    lo, hi = jackknife_ratio(one, one, one)
    assert np.isnan(lo).all() and np.isnan(hi).all()
    # a layer whose self terms vanish without one batch: that leave-one-out ratio is undefined
    a = np.array([[1.0], [0.0], [0.0]])
    lo, hi = jackknife_ratio(np.array([[0.5], [0.0], [0.0]]), a, np.ones((3, 1)))
    assert np.isnan(lo).all() and np.isnan(hi).all()


def _unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    sk, sl = k.sum(0), l.sum(0)
    t = np.sum(k * l) + sk.sum() * sl.sum() / ((n - 1) * (n - 2)) - 2 * sk @ sl / (n - 2)
    return float(t / (n * (n - 3)))


def test_jackknife_covers_the_population_cka_better_than_the_percentile_bootstrap() -> None:
    """Gaussian features of known population CKA ||Σxy||²/(||Σxx|| ||Σyy||) (linear
    kernels: population HSIC = ||Cov(x, y)||²_F), 8 batches of 16, 240 replicates."""
    rng = np.random.default_rng(7)
    r, d, s, k, b = 3, 6, 1.0, 8, 16
    w1 = rng.standard_normal((r, d))
    w2 = 0.5 * w1 + rng.standard_normal((r, d))
    sxy = w1.T @ w2
    sxx, syy = w1.T @ w1 + s * s * np.eye(d), w2.T @ w2 + s * s * np.eye(d)
    truth = np.sum(sxy**2) / (np.linalg.norm(sxx) * np.linalg.norm(syy))
    hits_j = hits_p = 0
    reps = 240
    for rep in range(reps):
        t = np.empty((k, 3))
        for i in range(k):
            z = rng.standard_normal((b, r))
            x = z @ w1 + s * rng.standard_normal((b, d))
            y = z @ w2 + s * rng.standard_normal((b, d))
            kx, ly = x @ x.T, y @ y.T
            t[i] = _unbiased_hsic(kx, ly), _unbiased_hsic(kx, kx), _unbiased_hsic(ly, ly)
        lo, hi = jackknife_ratio(t[:, :1], t[:, 1:2], t[:, 2:])
        hits_j += int(lo[0] <= truth <= hi[0])
        lo, hi = bootstrap_ratio(t[:, :1], t[:, 1:2], t[:, 2:], resamples=400, seed=rep)
        hits_p += int(lo[0] <= truth <= hi[0])
    # binomial sd of a coverage estimate from 240 replicates at 0.95 is 0.014
    assert hits_j / reps >= 0.91
    assert hits_j > hits_p
