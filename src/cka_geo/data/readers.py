"""Reading one image or mask file (.tif/.tiff/.npy) into an array, with its band axis found.

Conventions: see :mod:`cka_geo.data.folders`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from cka_geo.errors import DataError, UsageError

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".npy")
ARRAY_SUFFIXES: tuple[str, ...] = (".npy", ".pt", ".pth")
#: Files a tile folder may hold beside its images; they are skipped, not read.
SIDE_SUFFIXES: tuple[str, ...] = (".csv", ".json", ".geojson", ".txt", ".md", ".xml", ".aux")

Layout = Literal["auto", "chw", "hwc"]

def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _suffix(path: Path) -> str:
    return path.suffix.lower()


def _check_suffix(path: Path, allowed: Sequence[str]) -> None:
    if _suffix(path) not in allowed:
        raise DataError(
            f"{path}: unknown suffix {path.suffix or '(none)'!r} (expected {', '.join(allowed)})"
        )


def _read_raw(path: Path) -> np.ndarray:
    _check_suffix(path, IMAGE_SUFFIXES)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if _suffix(path) == ".npy":
            return np.load(path, allow_pickle=False)
        import tifffile

        return tifffile.imread(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc


def _peek_shape(path: Path) -> tuple[int, ...]:
    """Shape of an image file without reading its pixels (npy header, TIFF series)."""
    _check_suffix(path, IMAGE_SUFFIXES)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        if _suffix(path) == ".npy":
            return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tuple(tif.series[0].shape)
    except Exception as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc


def _band_axis(shape: tuple[int, ...], path: Path, bands: int | None, layout: Layout) -> int:
    """Index of the band axis of a 3-D image shape (0 or 2); validates the band count."""
    if len(shape) == 2:
        found = 1
        axis = -1
    elif len(shape) == 3:
        if layout == "chw":
            axis = 0
        elif layout == "hwc":
            axis = 2
        elif bands is not None and shape[0] == bands:
            axis = 0
        elif bands is not None and shape[2] == bands:
            axis = 2
        else:
            axis = 0 if shape[0] <= shape[2] else 2
        found = shape[axis]
    else:
        raise DataError(
            f"{path}: array of shape {tuple(shape)}; expected (H, W), (C, H, W) or (H, W, C)"
        )
    if bands is not None and found != bands:
        raise DataError(f"{path}: {found} bands, expected {bands} (shape {tuple(shape)})")
    return axis


def _hw(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    if axis == -1:
        return int(shape[0]), int(shape[1])
    rest = [s for i, s in enumerate(shape) if i != axis]
    return int(rest[0]), int(rest[1])


def read_image(
    path: str | Path, *, bands: int | None = None, layout: Layout = "auto"
) -> np.ndarray:
    """Read one image file as a (C, H, W) array in its stored dtype.

    Args:
        path: A ``.tif``/``.tiff`` (tifffile) or ``.npy`` file.
        bands: Expected band count (checked; also settles an ambiguous layout).
        layout: ``"auto"`` (see the module docstring), ``"chw"`` or ``"hwc"``.

    Returns:
        The image (C, H, W).

    Raises:
        DataError: Unknown suffix, unreadable file, bad rank or wrong band count.
    """
    path = Path(path)
    arr = _read_raw(path)
    axis = _band_axis(arr.shape, path, bands, layout)
    if axis == -1:
        return arr[None]
    return arr if axis == 0 else np.moveaxis(arr, 2, 0)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label mask as int64 (H, W); a (1, H, W) or (H, W, 1) array is squeezed."""
    path = Path(path)
    arr = _read_raw(path)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[2]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:2])
    if arr.ndim != 2:
        raise DataError(f"{path}: mask of shape {tuple(arr.shape)}; expected (H, W)")
    if np.issubdtype(arr.dtype, np.floating) and (
        not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr))
    ):
        raise DataError(f"{path}: mask holds non-integer values")
    return arr.astype(np.int64)


def _as_stats(
    v: Sequence[float] | np.ndarray | None, n: int | None, name: str
) -> np.ndarray | None:
    if v is None:
        return None
    a = np.asarray(v, dtype=np.float64).reshape(-1)
    if n is not None and a.size != n:
        raise UsageError(f"{name} has {a.size} values, expected one per band ({n})")
    if name == "std" and np.any(a <= 0):
        raise UsageError("std values must be > 0")
    return a


def _to_tensor(
    img: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None, path: Path
) -> torch.Tensor:
    x = np.asarray(img, dtype=np.float32)
    if mean is not None or std is not None:
        c = x.shape[-3]
        m = mean if mean is not None else np.zeros(c)
        s = std if std is not None else np.ones(c)
        if m.size != c or s.size != c:
            raise DataError(f"{path}: {c} bands but mean/std have {m.size}/{s.size} values")
        shape = (c, 1, 1)
        x = ((x - m.reshape(shape)) / s.reshape(shape)).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(x))
