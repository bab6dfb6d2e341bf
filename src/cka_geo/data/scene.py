"""The shipped Sentinel-2 scene file: its lossless band encoding and the 10 m grid.

``s2_l1c_scene.npz`` (built by ``scripts/build_embedded_s2.py``; see docs/data.md) holds
each of the 13 bands **on its native grid** (10, 20 or 60 m), losslessly: every band is
stored as ``uint8 (2, h, w)``, the low and the high byte of the zig-zag coded row
differences of its uint16 values (:func:`encode_band`; the planes deflate to close to the
residual's entropy). The JSON sidecar ``s2_l1c_scene.json`` gives each band's grid
(``grids``: origin and pixel size in UTM metres) and the window on the 10 m grid of B02.

On load the coarse bands are put on the 10 m grid by **nearest neighbour in map
coordinates** (:func:`to_grid`: each 10 m pixel takes the coarser pixel that contains its
centre; values are copied, never blended) and the 13-band 10 m scene is cached in memory
(:func:`full_scene`). The training crop of :mod:`cka_geo.data.embedded` is a window of it
(``crop`` in the sidecar).

Only numpy is imported here.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import numpy as np

from cka_geo.errors import DataError

SCENE_NPZ = "s2_l1c_scene.npz"
SCENE_JSON = "s2_l1c_scene.json"


def encode_band(values: np.ndarray) -> np.ndarray:
    """Reversible integer filter of one band: ``uint16 (h, w)`` -> ``uint8 (2, h, w)``.

    Row differences (the first row kept) modulo 2**16, zig-zag coded (0, -1, 1, -2, ... ->
    0, 1, 2, 3, ...), split into the low byte (plane 0) and the high byte (plane 1).
    """
    if values.dtype != np.uint16 or values.ndim != 2:
        raise ValueError(f"expected a uint16 (h, w) band, got {values.dtype} {values.shape}")
    v = values.astype(np.int32)
    d = np.diff(v, axis=0, prepend=np.zeros((1, v.shape[1]), dtype=np.int32))
    d = ((d + 32768) % 65536) - 32768  # the difference modulo 2**16, in -32768..32767
    z = ((d << 1) ^ (d >> 31)).astype(np.uint16)
    return np.stack([(z & 0xFF).astype(np.uint8), (z >> 8).astype(np.uint8)])


def decode_band(planes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_band`: ``uint8 (2, h, w)`` -> ``uint16 (h, w)``."""
    if planes.dtype != np.uint8 or planes.ndim != 3 or planes.shape[0] != 2:
        raise ValueError(f"expected uint8 (2, h, w) planes, got {planes.dtype} {planes.shape}")
    z = planes[0].astype(np.uint16) | (planes[1].astype(np.uint16) << 8)
    d = (z >> 1) ^ (-(z & 1).astype(np.int32)).astype(np.uint16)
    return np.cumsum(d, axis=0, dtype=np.uint16)


def to_grid(
    arr: np.ndarray,
    x0: float,
    y0: float,
    res: float,
    gx0: float,
    gy0: float,
    shape: tuple[int, int],
) -> np.ndarray:
    """Nearest-neighbour resample ``arr`` onto the 10 m grid of origin (gx0, gy0) and ``shape``.

    Each target pixel takes the source pixel (origin (x0, y0), pixel size ``res``) that
    contains its centre.

    Raises:
        ValueError: If the target grid is not wholly inside the source's extent.
    """
    h, w = shape
    xs = gx0 + 10.0 * (np.arange(w) + 0.5)
    ys = gy0 - 10.0 * (np.arange(h) + 0.5)
    cols = np.floor((xs - x0) / res).astype(np.int64)
    rows = np.floor((y0 - ys) / res).astype(np.int64)
    if cols.min() < 0 or rows.min() < 0 or cols.max() >= arr.shape[1] or rows.max() >= arr.shape[0]:
        raise ValueError("the 10 m window falls outside a coarse band's extent")
    return arr[rows[:, None], cols[None, :]]


@functools.lru_cache(maxsize=1)
def full_scene() -> tuple[np.ndarray, dict[str, Any]]:
    """The whole shipped scene on the 10 m grid and its sidecar (cached, read-only).

    Returns:
        ``(bands, metadata)``: uint16 (13, H, W) in the band order of the sidecar's
        ``band_names``; the metadata as read from ``s2_l1c_scene.json``.

    Raises:
        DataError: If the package data is missing or malformed.
    """
    root = resources.files("cka_geo.data")
    try:
        meta = json.loads((root / SCENE_JSON).read_text(encoding="utf-8"))
        win = meta["window"]
        h, w, gx0, gy0 = int(win["height"]), int(win["width"]), float(win["x0"]), float(win["y0"])
        out = np.empty((len(meta["band_names"]), h, w), dtype=np.uint16)
        with (root / SCENE_NPZ).open("rb") as fh, np.load(fh) as npz:
            for i, name in enumerate(meta["band_names"]):
                grid = meta["grids"][name]
                native = decode_band(np.asarray(npz[name]))
                if list(native.shape) != grid["shape"]:
                    raise ValueError(f"band {name} is {native.shape}, the sidecar says {grid['shape']}")
                x0, y0, res = float(grid["x0"]), float(grid["y0"]), float(grid["pixel_size"])
                out[i] = to_grid(native, x0, y0, res, gx0, gy0, (h, w))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise DataError(f"embedded scene cka_geo/data/{SCENE_NPZ} unreadable: {exc}") from exc
    out.setflags(write=False)
    return out, meta


__all__ = ["SCENE_JSON", "SCENE_NPZ", "decode_band", "encode_band", "full_scene", "to_grid"]
