"""Derived labels against their formulas, on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cka_geo.data import labels as lab

_band = arrays(np.uint16, (3, 5), elements=st.integers(0, 12000))


def test_ndwi_ndvi_by_hand() -> None:
    g = np.array([[1000, 300, 0]], dtype=np.uint16)
    n = np.array([[500, 900, 0]], dtype=np.uint16)
    r = np.array([[400, 100, 0]], dtype=np.uint16)
    assert np.allclose(lab.ndwi(g, n), [[500 / 1500, -600 / 1200, 0.0]])
    assert np.allclose(lab.ndvi(r, n), [[100 / 900, 800 / 1000, 0.0]])
    assert lab.water_mask(g, n).tolist() == [[True, False, False]]
    assert lab.water_mask(g, n, threshold=0.5).tolist() == [[False, False, False]]


def test_cover_map_by_hand() -> None:
    # pixel 0: water (NDWI 0.33); 1: vegetation (NDVI 0.8); 2: bare (NDVI 0.2);
    # 3: water beats vegetation (NDWI > 0 and NDVI > 0.5 cannot both hold, so force via thr)
    g = np.array([1000, 300, 800, 600], dtype=np.float64)
    n = np.array([500, 900, 1000, 700], dtype=np.float64)
    r = np.array([400, 100, 667, 100], dtype=np.float64)
    cover = lab.cover_map(g, r, n)
    assert cover.tolist() == [lab.WATER, lab.VEGETATION, lab.OTHER, lab.VEGETATION]
    cover = lab.cover_map(g, r, n, water_threshold=-0.1)
    assert cover.tolist()[3] == lab.WATER  # NDWI -0.077 > -0.1: water wins over vegetation


def test_fractions_dominant_and_vegetation_fraction() -> None:
    cover = np.array(
        [
            [[0, 0], [1, 2]],  # water dominant (2 of 4)
            [[1, 1], [1, 2]],  # vegetation 3/4
            [[0, 1], [2, 2]],  # other
            [[0, 1], [1, 0]],  # tie water/vegetation -> water (lowest index)
        ]
    )
    fr = lab.class_fractions(cover)
    assert np.allclose(fr[0], [0.5, 0.25, 0.25])
    assert np.allclose(fr.sum(-1), 1.0)
    assert lab.dominant_class(fr).tolist() == [0, 1, 2, 0]
    assert np.allclose(lab.vegetation_fraction(cover), [0.25, 0.75, 0.25, 0.5])


@settings(max_examples=60, deadline=None)
@given(_band, _band, _band, st.floats(-0.5, 0.5), st.floats(0.0, 0.9))
def test_cover_map_matches_formula(
    g: np.ndarray, r: np.ndarray, n: np.ndarray, wt: float, vt: float
) -> None:
    cover = lab.cover_map(g, r, n, water_threshold=wt, vegetation_threshold=vt)
    for idx in np.ndindex(g.shape):
        gg, rr, nn = float(g[idx]), float(r[idx]), float(n[idx])
        w = (gg - nn) / (gg + nn) if gg + nn else 0.0
        v = (nn - rr) / (nn + rr) if nn + rr else 0.0
        expected = 0 if w > wt else (1 if v > vt else 2)
        assert cover[idx] == expected


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (4, 6), elements=st.one_of(st.just(0.0), st.floats(1e-6, 1e4))), st.floats(0.1, 10))
def test_normalized_difference_scale_free_and_bounded(a: np.ndarray, k: float) -> None:
    b = a[::-1].copy()
    d = lab.normalized_difference(a, b)
    assert np.all(np.abs(d) <= 1 + 1e-12)
    assert np.allclose(lab.normalized_difference(a * k, b * k), d, atol=1e-9)
    assert np.allclose(lab.normalized_difference(b, a), -d)


def test_zero_denominator_is_zero() -> None:
    z = np.zeros((2, 2), dtype=np.uint16)
    assert np.array_equal(lab.ndwi(z, z), np.zeros((2, 2)))
    assert lab.cover_map(z, z, z).tolist() == [[2, 2], [2, 2]]


@pytest.mark.parametrize("shape", [(3, 3), (2, 8, 8)])
def test_fraction_shapes(shape: tuple[int, ...]) -> None:
    cover = np.zeros(shape, dtype=np.int64)
    assert lab.class_fractions(cover).shape == (*shape[:-2], 3)
