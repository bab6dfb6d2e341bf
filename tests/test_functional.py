"""The functional core against the independent float64 reference, and CKA's invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from cka_geo.errors import FeatureError, UsageError
from cka_geo.functional import (
    cka,
    gram,
    gram_rbf,
    hsic,
    linear_cka_feature_space,
    rbf_sigma,
    squared_distances,
    u_center_gram,
)

KERNELS = ["linear", "rbf"]
ESTIMATORS = ["unbiased", "biased"]


def data(seed: int, n: int, p: int, q: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """x (n, p) and a y (n, q) that depends on x non-trivially."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, p))
    q = p if q is None else q
    y = np.tanh(x @ rng.standard_normal((p, q))) + 0.5 * rng.standard_normal((n, q))
    return x, y


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


shapes = st.tuples(st.integers(0, 2**31 - 1), st.integers(6, 40), st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from(KERNELS), st.sampled_from(ESTIMATORS))
def test_cka_matches_reference(shape, kernel, estimator):
    seed, n, p, q = shape
    x, y = data(seed, n, p, q)
    got = cka(t(x), t(y), kernel, estimator).item()
    want = ref.cka(x, y, kernel, estimator)
    assert got == pytest.approx(want, abs=1e-10)


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from(KERNELS), st.sampled_from(ESTIMATORS))
def test_self_similarity_is_one_and_cka_is_symmetric(shape, kernel, estimator):
    seed, n, p, q = shape
    x, y = data(seed, n, p, q)
    assert cka(t(x), t(x), kernel, estimator).item() == pytest.approx(1.0, abs=1e-12)
    assert cka(t(x), t(y), kernel, estimator).item() == pytest.approx(
        cka(t(y), t(x), kernel, estimator).item(), abs=1e-12
    )


@settings(max_examples=30, deadline=None)
@given(shapes, st.sampled_from(KERNELS), st.sampled_from(ESTIMATORS), st.floats(1e-3, 1e3), st.floats(-50, 50))
def test_invariant_to_orthogonal_maps_isotropic_scaling_and_translation(shape, kernel, estimator, scale, shift):
    seed, n, p, q = shape
    x, y = data(seed, n, p, q)
    rng = np.random.default_rng(seed + 1)
    qmat, _ = np.linalg.qr(rng.standard_normal((p, p)))
    x2 = scale * x @ qmat + shift * rng.standard_normal(p)
    base = cka(t(x), t(y), kernel, estimator).item()
    assert cka(t(x2), t(y), kernel, estimator).item() == pytest.approx(base, abs=1e-9)


def test_not_invariant_to_a_general_invertible_linear_map():
    x, y = data(3, 60, 5)
    a = np.diag([1.0, 1.0, 1.0, 1.0, 30.0])  # invertible, not orthogonal up to scale
    for estimator in ESTIMATORS:
        base = cka(t(x), t(y), "linear", estimator).item()
        moved = cka(t(x @ a), t(y), "linear", estimator).item()
        assert abs(moved - base) > 0.05
        assert cka(t(x), t(x @ a), "linear", estimator).item() < 0.9


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from(ESTIMATORS))
def test_gram_space_equals_feature_space_linear_cka(shape, estimator):
    seed, n, p, q = shape
    x, y = data(seed, n, p, q)
    via_grams = cka(t(x), t(y), "linear", estimator).item()
    via_features = linear_cka_feature_space(t(x), t(y), estimator).item()
    assert via_grams == pytest.approx(via_features, abs=1e-10)


@pytest.mark.parametrize("n", [4, 5, 6, 7])
@pytest.mark.parametrize("kernel", KERNELS)
def test_unbiased_hsic_equals_the_bruteforce_u_statistic(n, kernel):
    x, y = data(n, n, 3, 2)
    k, l = ref.gram(x, kernel), ref.gram(y, kernel)
    got = hsic(t(k), t(l), "unbiased").item()
    assert got == pytest.approx(ref.hsic_ustatistic(k, l), rel=1e-10, abs=1e-12)
    assert ref.hsic_unbiased(k, l) == pytest.approx(ref.hsic_ustatistic(k, l), rel=1e-10, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(shapes)
def test_u_centred_inner_product_is_song_hsic(shape):
    seed, n, p, q = shape
    x, y = data(seed, n, p, q)
    k, l = ref.gram_linear(x), ref.gram_rbf(y, 0.4)
    got = (u_center_gram(t(k)) * u_center_gram(t(l))).sum().item() / (n * (n - 3))
    assert got == pytest.approx(ref.hsic_unbiased(k, l), rel=1e-9, abs=1e-12)
    assert hsic(t(k), t(l), "biased").item() == pytest.approx(ref.hsic_biased(k, l), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("n", [6, 7])  # odd and even pair counts (15 and 21 pairs; 21 odd)
@pytest.mark.parametrize("frac", [0.2, 0.4, 0.8])
def test_rbf_bandwidth_is_frac_times_median_pairwise_distance(n, frac):
    x, _ = data(n, n, 4)
    sigma = rbf_sigma(squared_distances(t(x)), frac).item()
    assert sigma == pytest.approx(ref.rbf_sigma(x, frac), rel=1e-12)
    k, s = gram_rbf(t(x), frac)
    assert s.item() == pytest.approx(sigma, rel=1e-12)
    np.testing.assert_allclose(k.numpy(), ref.gram_rbf(x, frac), rtol=1e-10, atol=1e-12)


def test_rbf_median_averages_the_two_middle_pairs_for_an_even_count():
    # n = 5 gives 10 pairs: the median is the mean of the 5th and 6th smallest.
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]], dtype=torch.float64)
    d = np.sort(ref.sq_dists(x.numpy())[np.triu_indices(5, 1)])
    want = 0.5 * np.sqrt((d[4] + d[5]) / 2)
    assert rbf_sigma(squared_distances(x), 0.5).item() == pytest.approx(want, rel=1e-12)


def test_constant_representation_gives_nan_not_a_made_up_number():
    x = torch.ones(10, 3, dtype=torch.float64)
    y = torch.randn(10, 3, dtype=torch.float64)
    for kernel in KERNELS:
        assert torch.isnan(cka(x, y, kernel))


def test_tiny_scale_features_are_not_distorted_by_an_epsilon():
    x, y = data(0, 30, 5)
    base = cka(t(x), t(y)).item()
    assert cka(t(x * 1e-8), t(y * 1e-6)).item() == pytest.approx(base, abs=1e-10)


def test_unbiased_cka_is_not_clamped():
    rng = np.random.default_rng(0)
    values = [cka(t(rng.standard_normal((20, 3))), t(rng.standard_normal((20, 3)))).item() for _ in range(20)]
    assert min(values) < 0  # independent data: debiased CKA straddles 0


def test_errors_name_the_problem():
    x = torch.randn(3, 2)
    with pytest.raises(FeatureError, match="at least 4 samples"):
        cka(x, x)
    with pytest.raises(FeatureError, match="same number of samples"):
        cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(UsageError, match="unknown kernel 'poly'"):
        cka(torch.randn(5, 2), torch.randn(5, 2), kernel="poly")  # type: ignore[arg-type]
    with pytest.raises(FeatureError, match=r"shape \(samples, features\)"):
        gram(torch.randn(5))
