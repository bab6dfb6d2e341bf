"""Labels derived from spectral indices (not ground truth).

The embedded scene has no reference labels, so the tasks served on it use labels computed
from Sentinel-2 reflectances with fixed, published indices. They are *derived labels*: they
follow the thresholds below exactly and inherit their known errors (wet marsh and shallow
turbid water both read as water; winter crops and grass as vegetation; bare soil, sand,
roads and roofs all fall into one class). Use them to train and compare models, never as a
land-cover map.

Formulas (bands as reflectances or digital numbers; the ratios are scale-free):

* NDWI (McFeeters 1996) = (G - NIR) / (G + NIR) with G = B3, NIR = B8.
  Water where NDWI > ``water_threshold`` (default 0.0, McFeeters' original threshold; the
  embedded scene's NDWI histogram has its trough there).
* NDVI (Rouse et al. 1974) = (NIR - R) / (NIR + R) with R = B4, NIR = B8.
  Vegetation where not water and NDVI > ``vegetation_threshold`` (default 0.5).
* Cover class per pixel: 0 water, 1 vegetation, 2 other (bare soil, built-up, sparse
  vegetation).
* Per tile: the fraction of each class; the dominant class is the argmax of the fractions
  (ties go to the lower class index); the vegetation fraction is the fraction of class 1.

Where a denominator is zero the index is defined as 0.
"""

from __future__ import annotations

import numpy as np

#: Names of the cover classes, by index.
COVER_CLASSES: tuple[str, ...] = ("water", "vegetation", "other")
WATER, VEGETATION, OTHER = 0, 1, 2

#: Default NDWI threshold for water (McFeeters 1996).
WATER_THRESHOLD = 0.0
#: Default NDVI threshold for vegetation.
VEGETATION_THRESHOLD = 0.5


def normalized_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return (a - b) / (a + b) in float64, 0 where a + b == 0.

    Args:
        a: First band (any real dtype).
        b: Second band, same shape.

    Returns:
        The index, float64, same shape.
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    den = a64 + b64
    out = np.zeros(np.broadcast(a64, b64).shape, dtype=np.float64)
    np.divide(a64 - b64, den, out=out, where=den != 0)
    return out


def ndwi(green: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """McFeeters NDWI = (G - NIR) / (G + NIR) (Sentinel-2: B3, B8)."""
    return normalized_difference(green, nir)


def ndvi(red: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """NDVI = (NIR - R) / (NIR + R) (Sentinel-2: B4, B8)."""
    return normalized_difference(nir, red)


def water_mask(
    green: np.ndarray, nir: np.ndarray, threshold: float = WATER_THRESHOLD
) -> np.ndarray:
    """Boolean water mask: NDWI > ``threshold``."""
    return ndwi(green, nir) > threshold


def cover_map(
    green: np.ndarray,
    red: np.ndarray,
    nir: np.ndarray,
    *,
    water_threshold: float = WATER_THRESHOLD,
    vegetation_threshold: float = VEGETATION_THRESHOLD,
) -> np.ndarray:
    """Per-pixel cover class: 0 water, 1 vegetation, 2 other.

    Args:
        green: B3.
        red: B4.
        nir: B8.
        water_threshold: NDWI above which a pixel is water.
        vegetation_threshold: NDVI above which a non-water pixel is vegetation.

    Returns:
        int64 array of the bands' shape.
    """
    water = water_mask(green, nir, water_threshold)
    veg = ~water & (ndvi(red, nir) > vegetation_threshold)
    out = np.full(water.shape, OTHER, dtype=np.int64)
    out[veg] = VEGETATION
    out[water] = WATER
    return out


def class_fractions(cover: np.ndarray, num_classes: int = len(COVER_CLASSES)) -> np.ndarray:
    """Fraction of each class over the last two axes.

    Args:
        cover: Integer class map (..., h, w).
        num_classes: Number of classes.

    Returns:
        float64 array (..., num_classes) summing to 1.
    """
    cover = np.asarray(cover)
    n = cover.shape[-1] * cover.shape[-2]
    onehot = cover[..., None] == np.arange(num_classes)
    return onehot.sum(axis=(-3, -2)) / n


def dominant_class(fractions: np.ndarray) -> np.ndarray:
    """Argmax of class fractions along the last axis (ties: lowest index)."""
    return np.argmax(np.asarray(fractions), axis=-1)


def vegetation_fraction(cover: np.ndarray) -> np.ndarray:
    """Fraction of vegetation pixels (class 1) over the last two axes."""
    return class_fractions(cover)[..., VEGETATION]


__all__ = [
    "COVER_CLASSES",
    "OTHER",
    "VEGETATION",
    "VEGETATION_THRESHOLD",
    "WATER",
    "WATER_THRESHOLD",
    "class_fractions",
    "cover_map",
    "dominant_class",
    "ndvi",
    "ndwi",
    "normalized_difference",
    "vegetation_fraction",
    "water_mask",
]
